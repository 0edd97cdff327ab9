"""Worker for test_checkpointing.py (launched by the harness or directly); see checkpoint_run.py.

dist-checkpoint saving starts a helper process (spawn) that re-imports this file, so everything
heavy lives in checkpoint_run.py and is imported only under the __main__ guard.
"""

if __name__ == "__main__":
    from training.workers.checkpoint_run import main

    main()
