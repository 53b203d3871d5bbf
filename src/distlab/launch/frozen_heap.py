"""Imported last by the rank server: moves everything the server has imported out of the
garbage collector's sight, so that the ranks forked from it do not collect it again.

A forked rank shares the server's heap: the objects torch, DeepSpeed and the compiler
create at import (300,000 with torch and distlab alone, 415,000 in a test session's
server). Python's collector walks every tracked object at each full (generation 2)
collection, and every rank runs at least one (the training step allocates enough):
measured here, 0.27-0.36 s of a short ddp rank's 0.9 s went to one such collection, and it
wrote to each object's header, so the rank copied the server's pages as it went.
``gc.freeze`` puts the server's objects in the permanent generation, which no collection
visits; they are never garbage (the server keeps its modules for its whole life), so
nothing is lost. This is the use Python's ``gc.freeze`` documentation gives. The
forkserver offers no hook but "import these modules", hence a module that does its work
when imported.
"""

from __future__ import annotations

import gc

# No gc.collect() first: a full collection here would delay the first ranks by the very
# walk this avoids (0.2-0.4 s, measured), and what the imports left as garbage would cost
# a rank nothing either way (shared pages it never touches).
gc.freeze()
