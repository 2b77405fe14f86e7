"""``fastkd dump``: every pool member's outputs on every stored view, once, into the store.

The work is cut into the store's blocks (a run of samples, all their views, all models). A block
is fed to the models as a fixed sequence of batches (``data.plan_batches`` never lets a batch
straddle a block) and written whole, then marked done, by ``StoreWriter.write_block``. So a dump
killed at any point resumes with the blocks that carry no marker, feeds them the very batches an
uninterrupted run would have, and the finished store is bit for bit the same. Ranks (``--part
i/n``, or torchrun's RANK/WORLD_SIZE) each write their part, disjoint blocks of one store.

The writes run in one thread of their own (``block_writer``), fed a few whole blocks at a time,
so inference goes on while a block is encoded, hashed and compressed; a block is still marked
only once written, the thread is joined before the store is closed, and its failure is raised
in the dump's own thread.

Modules: ``block_writer`` (``BackgroundWrites``: the writer thread and its queue), ``config``
(``DumpConfig``, the manifest a dump writes), ``run`` (the blocks, their inference and writing:
``run_dump``; the pool as it runs, ``prepare_pool`` and ``member_logits``, which the benchmarks'
ceiling shares), importing both.
"""

from fastkd.dump.config import (
    DEFAULT_TAIL_SAMPLES,
    DumpConfig,
    build_manifest,
    check_classes,
    model_entry,
)
from fastkd.dump.run import member_logits, plan_blocks, prepare_pool, run_dump

__all__ = [
    "DEFAULT_TAIL_SAMPLES",
    "DumpConfig",
    "build_manifest",
    "check_classes",
    "member_logits",
    "model_entry",
    "plan_blocks",
    "prepare_pool",
    "run_dump",
]
