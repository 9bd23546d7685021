"""Attention's strip path on several cores: chunks of the (B*H) head stack on Python threads, each
thread's BLAS calls on one BLAS thread.

Why not let BLAS thread each matmul: the strip path's matmuls are small (one strip: 128 query rows
by at most T keys, depth D = 64) and OpenBLAS splits each one over its threads with a hand-off
per call; on the 2-core machine that ran at well under twice the one-thread rate (T = 2048:
322 ms at 2 threads, 631 ms at 1, quiet machine), and it stalls when another process holds a
core (a thread of every call waits for it: 12.6 s instead of 1.1 s at load ~6). Heads are
independent, so instead each worker thread takes whole heads: its matmuls run on one BLAS thread
in the calling thread (NumPy's matmul releases the GIL) and its Numba softmax passes are
compiled ``nogil=True``, so the workers really run at once.

``workers(n_heads)``: how many threads to use: the BLAS library's current thread count (so
``threadpoolctl.threadpool_limits(1)`` or OMP_NUM_THREADS=1 keeps everything on one core), capped
by the cores this process may run on, by the number of heads and by MAX_WORKERS. It is 1, and
the chunks run in turn in the calling thread with BLAS as it was, where threadpoolctl is not
installed (it is optional: the core needs only NumPy), where no BLAS library is found, or with
a single head.

``split(n_heads, head_bytes)`` cuts the stack into chunks of at most CHUNK_BYTES of strip scores;
``over_heads(task, chunks)`` runs ``task(start, stop)`` on each, the calling thread and a
persistent pool taking the next chunk not yet started, with the BLAS limit at one thread for
the duration. The BLAS thread count is process-wide: a matmul of another Python thread that
overlaps the call also runs on one thread. threadpoolctl lets only one live Python thread change
OpenBLAS's limit; if the limit did not take (another thread holds it), the chunks run in turn in
the calling thread instead, correct but not parallel.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

# A chunk holds at most this many bytes of one strip's scores (heads x STRIP_Q x Tk floats), so
# a strip stays in a core's L2 cache (1 MiB here) between the matmul that writes it, the softmax
# pass and the matmul that reads it; it was 16 MiB for all 16 heads at T = 2048. Small chunks
# also balance the threads when another process holds a core: each thread takes the next chunk
# not yet started. Measured at T = 2048, one thread, process CPU time on the loaded machine:
# one chunk of 16 heads 700 ms, 8 of 2 heads 680 ms, 16 of one head 580 ms; at two threads the
# one-head chunks also ran faster than two chunks of 8 (1785 vs 1885 ms wall, load ~6).
CHUNK_BYTES = 1 << 20

# A cap on ``workers`` (None: none). 1 runs the chunks in turn in the calling thread, BLAS
# threading each matmul; with CHUNK_BYTES = 1 << 62 too it is the strip path as before this
# module (one chunk: bench/attention.py --serial's "strips_one_chunk" row; tests compare).
MAX_WORKERS: int | None = None

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0
_lock = threading.Lock()
_blas = None                    # threadpoolctl controller of the BLAS libraries; False without one


def _blas_controller():
    """threadpoolctl's controller over the loaded BLAS libraries (made once), or False."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas = False
        else:
            controller = ThreadpoolController().select(user_api="blas")
            _blas = controller if controller.lib_controllers else False
    return _blas


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _blas_threads(controller) -> int:
    return max((lib.num_threads or 1) for lib in controller.lib_controllers)


def workers(n_heads: int) -> int:
    """Threads the strip path may run ``n_heads`` heads on (see the module docstring)."""
    if n_heads < 2:
        return 1
    controller = _blas_controller()
    if not controller:
        return 1
    cap = n_heads if MAX_WORKERS is None else MAX_WORKERS
    return max(1, min(_blas_threads(controller), _cores(), n_heads, cap))


def chunks(n_heads: int, n_workers: int) -> list[tuple[int, int]]:
    """``n_workers`` contiguous (start, stop) ranges covering range(n_heads), sizes differing by
    at most one (an odd head count leaves one chunk a head longer)."""
    n_workers = max(1, min(n_workers, n_heads))
    base, extra = divmod(n_heads, n_workers)
    bounds, start = [], 0
    for index in range(n_workers):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def split(n_heads: int, head_bytes: int) -> list[tuple[int, int]]:
    """The chunks the strip path cuts ``n_heads`` heads into, each ``head_bytes`` of strip scores
    per head: at most CHUNK_BYTES a chunk (at least one head), and at least one per worker."""
    per_chunk = max(1, CHUNK_BYTES // max(1, head_bytes))
    return chunks(n_heads, max(workers(n_heads), -(-n_heads // per_chunk)))


def _get_pool(size: int) -> ThreadPoolExecutor:
    """The persistent pool, with at least ``size`` threads. Made again in a forked child: the
    parent's threads do not exist there, but its pool would count them as idle and wait on them."""
    global _pool, _pool_size, _pool_pid
    with _lock:
        if _pool is None or _pool_size < size or _pool_pid != os.getpid():
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="scratchlm-attention")
            _pool_size, _pool_pid = size, os.getpid()
        return _pool


def over_heads(task, bounds):
    """[(start, stop, task(start, stop))] for the chunks ``bounds`` (from ``chunks``), in order.
    With ``workers`` > 1 the chunks run on that many threads (the calling one and the pool), each
    thread taking the next chunk not yet started, with BLAS at one thread; else in turn in the
    calling thread."""
    n_heads = bounds[-1][1]
    controller = _blas_controller()
    n_threads = min(len(bounds), workers(n_heads)) if controller else 1
    if n_threads < 2:
        return [(start, stop, task(start, stop)) for start, stop in bounds]
    limit = controller.limit(limits=1)
    try:
        if _blas_threads(controller) != 1:               # another thread controls the BLAS limit
            return [(start, stop, task(start, stop)) for start, stop in bounds]
        results = [None] * len(bounds)
        todo = iter(range(len(bounds)))
        todo_lock = threading.Lock()

        def run_chunks():
            while True:
                with todo_lock:
                    index = next(todo, None)
                if index is None:
                    return
                results[index] = task(*bounds[index])

        pool = _get_pool(n_threads - 1)
        futures = [pool.submit(run_chunks) for _ in range(n_threads - 1)]
        try:
            run_chunks()
        finally:
            for future in futures:                       # wait for all, even if ours failed
                future.result()
        return [(start, stop, result) for (start, stop), result in zip(bounds, results)]
    finally:
        limit.restore_original_limits()
