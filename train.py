"""`python train.py ...` runs the Hydra entry point randlora.train (see README)."""
try:
    from randlora.train import main
except ModuleNotFoundError as e:  # the adapter library alone is installed, not the framework
    raise SystemExit(f"error: the training framework needs {e.name!r}; install it with "
                     "pip install -e '.[framework]' (or make install)") from None

if __name__ == "__main__":
    from randlora.training.launch import await_job
    await_job()  # in a local multirun's fork server: returns in each forked job (randlora/training/launch.py)
    main()
