"""`python train.py ...` runs the Hydra entry point randlora.train (see README)."""
from randlora.train import main

if __name__ == "__main__":
    main()
