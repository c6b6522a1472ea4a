from harness.quality.calibration import CalibConfig, build_calibration


def test_default_calibration_set(smollm2, data_dir):
    calib = build_calibration(smollm2.tokenizer, data_dir)
    assert len(calib.input_ids) == 256 and len(calib.texts) == 256
    assert calib.description["per_source"] == {"piqa": 128, "mmlu": 128}
    assert max(len(x) for x in calib.input_ids) <= 512
    assert sum("\nA. " in t and "\nAnswer: " in t for t in calib.texts) == 128  # MMLU questions with choices
    again = build_calibration(smollm2.tokenizer, data_dir)
    assert again.input_ids == calib.input_ids  # seeded
    other = build_calibration(smollm2.tokenizer, data_dir, CalibConfig(seed=1))
    assert other.input_ids != calib.input_ids
    assert calib.description["token_sha256_16"] != other.description["token_sha256_16"]


def test_truncation_and_split(tiny, data_dir):
    calib = build_calibration(tiny.tokenizer, data_dir, CalibConfig(n_samples=7, max_tokens=20, seed=3))
    assert len(calib.input_ids) == 7 and calib.description["per_source"] == {"piqa": 4, "mmlu": 3}
    assert all(len(x) <= 20 for x in calib.input_ids) and calib.description["truncated"] > 0
