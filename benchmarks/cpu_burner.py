import torch, time, sys
torch.set_num_threads(2)
a = torch.randn(768, 768); end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(50): a = torch.tanh(a @ a * 1e-3)
