"""`python -m seslib train --config run.json`: one run (what torchrun launches on every rank)."""
from .command import main

if __name__ == "__main__":
    main()
