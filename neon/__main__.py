"""`python -m neon` runs the `neon` command."""

from neon.cli import main

if __name__ == "__main__":
    main()
