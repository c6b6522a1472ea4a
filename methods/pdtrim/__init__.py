"""PDTrim (arXiv 2509.04467): the method, its search objectives, attention probe and healing."""
