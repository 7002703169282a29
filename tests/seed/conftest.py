"""The seed documents' examples, run against channels_core.

Each test is one example of the seed README (``winterforge-channels-README.txt``)
or ``winterforge-channels-getting_started.md``, rewritten only by SPEC's
mapping table (``Frag(affinities=['user'])`` -> ``Principal(kind='user')``,
permission/role/conversation Frags -> ``Permission``/``Role``/``Conversation``,
``Manifest`` from ``channels_core.primitives``). Context the seed leaves
implicit (``user``, ``channel``) is built with the same API first. The
seed's CLI section runs as ``test_cli.py``, through the console script.
"""

from __future__ import annotations

# The seed's CLI examples run through the installed console script against
# the same per-test database the CLI suite uses.
from tests.cli.conftest import cli_db  # noqa: E402, F401
