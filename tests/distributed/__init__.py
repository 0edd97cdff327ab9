"""Multi-process tests launched through torch.distributed.run (see harness.py)."""
