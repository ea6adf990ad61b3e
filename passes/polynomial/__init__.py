"""HE-friendly (polynomial-only) form of a transformer: calibrate, approximate, check the contract."""
