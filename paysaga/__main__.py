"""`python -m paysaga ...` is the `paysaga` CLI (the supervisor starts services this way)."""

from paysaga.cli import main

if __name__ == "__main__":
    main()
