"""The seed documents' examples, run against channels_core.

Each test is one example of ``/work/shared/seed/winterforge-channels-README.txt``
or ``winterforge-channels-getting_started.md``, rewritten only by SPEC's
mapping table (``Frag(affinities=['user'])`` -> ``Principal(kind='user')``,
permission/role/conversation Frags -> ``Permission``/``Role``/``Conversation``,
``Manifest`` from ``channels_core.primitives``). Context the seed leaves
implicit (``user``, ``channel``) is built with the same API first.
"""

from __future__ import annotations
