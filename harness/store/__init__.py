"""Records on disk, the regression check and the names records share. Torch-free: what `reports` reads."""
