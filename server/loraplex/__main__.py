"""`python -m loraplex` runs the command line, as the `loraplex` script does."""

from loraplex.cli import app

if __name__ == "__main__":
    app()
