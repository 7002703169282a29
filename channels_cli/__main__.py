"""``python -m channels_cli``: the same as the ``channels`` console script."""

from __future__ import annotations

from channels_cli.main import main

if __name__ == "__main__":
    main()
