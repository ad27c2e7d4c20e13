"""`python train.py ...` runs the Hydra entry point randlora.train (see README)."""
from randlora.train import main

if __name__ == "__main__":
    from randlora.training.launch import await_job
    await_job()  # in a local multirun's fork server: returns in each forked job (randlora/training/launch.py)
    main()
