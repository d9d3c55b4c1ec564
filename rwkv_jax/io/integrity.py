"""What keeps a checkpoint honest: a checksum of every array recorded at save and verified at
restore (orbax and tensorstore check their own indexes and manifests, not the array data, where a
flipped byte was restored without a word), finite parameters, and the classification of a
failed write or read into one line.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (no space or inodes left, a read-only or vanished
    directory). The checkpoints written before it are kept, its temporary is removed."""


class DamagedCheckpointError(ValueError):
    """A checkpoint's arrays differ from the checksums recorded when it was written."""


# The checksum of an array, as recorded: two position-weighted sums of its 32-bit words
# (_word_sums). Named so that a later format can be told apart from this one.
CHECKSUM_FORMAT = "wsum64/1"


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def _word_sums(x):
    """(2,) uint32: sum_i w_i * a_i and sum_i mix(w_i) * b_i (mod 2**32) over the array's
    32-bit words w_i (narrower elements widened, 64-bit ones split), with odd weights a_i, b_i
    that depend on the word's position. Any change to one word changes the first sum (an odd
    weight is invertible mod 2**32); moved or several changed words go unseen only where both
    sums come out the same (random damage: odds of about 2**-64). It guards against damage,
    not against tampering. Integer sums are exact in any order, so the result is the same bits
    for any sharding, device or process count, and it runs where the array lives: an
    all-reduce of two words per array, no copy to the host."""
    u32 = jnp.uint32
    if x.dtype == jnp.bool_:
        w = x.astype(u32)
    elif x.dtype.itemsize == 8:
        w = lax.bitcast_convert_type(x, u32)  # a trailing axis of 2 words
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: u32}[x.dtype.itemsize]
        w = lax.bitcast_convert_type(x, unsigned).astype(u32)
    # Each word's flat position from per-axis iotas: a reshape to 1-D could make XLA gather
    # a sharded array onto one device.
    pos, stride = jnp.zeros(w.shape, u32), 1
    for axis in reversed(range(w.ndim)):
        pos = pos + lax.broadcasted_iota(u32, w.shape, axis) * u32(stride % 2**32)
        stride *= w.shape[axis]
    m = pos * u32(0x9E3779B9) + u32(0x7F4A7C15)
    h = (w ^ (w >> 16)) * u32(0x85EBCA6B)
    h = h ^ (h >> 13)
    return jnp.stack([jnp.sum(w * (m | 1), dtype=u32),
                      jnp.sum(h * ((m ^ (m >> 15)) | 1), dtype=u32)])


_checksum_fn = None


def tree_checksums(tree) -> dict[str, str]:
    """{key path: 16 hex digits} of every array in `tree` (CHECKSUM_FORMAT), computed on the
    arrays' devices by one compiled call."""
    global _checksum_fn
    if _checksum_fn is None:
        _checksum_fn = jax.jit(lambda t: jax.tree.map(_word_sums, t))
    sums = jax.device_get(_checksum_fn(tree))
    return {jax.tree_util.keystr(path): f"{int(v[0]):08x}{int(v[1]):08x}"
            for path, v in jax.tree_util.tree_leaves_with_path(sums)}


def tree_dtypes(tree) -> dict[str, str]:
    """{key path: dtype name} of every array in `tree`, as tree_checksums keys them."""
    return {jax.tree_util.keystr(path): str(x.dtype)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def verify_checksums(tree, meta: dict, item: str, step: int, directory: str) -> None:
    """DamagedCheckpointError if an array of `tree` (the checkpoint's `item`) differs from the
    checksum its record holds; a one-line warning for a checkpoint written without them."""
    recorded = meta.get("checksums")
    if recorded is None:
        _warn_unverified(step, directory)
        return
    if meta.get("checksum_format") != CHECKSUM_FORMAT:
        raise DamagedCheckpointError(
            f"the checkpoint of step {step} in {directory} records checksums of format "
            f"{meta.get('checksum_format')!r}, which this version does not know (it computes "
            f"{CHECKSUM_FORMAT!r}): its record is damaged, or a newer rwkv_jax wrote it")
    recorded = recorded.get(item, {})
    actual = tree_checksums(tree)
    # An array restored in another dtype than it was written in (a resume in another
    # efficiency.precision casts the carried attention window) has other words: its sum
    # cannot be compared, which is a change of settings, not damage.
    saved_dtypes = meta.get("checksum_dtypes", {}).get(item, {})
    now = tree_dtypes(tree)
    actual = {k: v for k, v in actual.items() if saved_dtypes.get(k, now[k]) == now[k]}
    bad = [k for k, v in actual.items() if recorded.get(k, v) != v]
    missing = [k for k in actual if k not in recorded]
    if bad or missing:
        what = {"params": "parameter", "train": "optimizer and carried-state"}.get(item, item)
        names = ", ".join((bad or missing)[:3]) + (" ..." if len(bad or missing) > 3 else "")
        raise DamagedCheckpointError(
            f"the checkpoint of step {step} in {directory} is damaged: "
            + (f"{len(bad)} of its {len(actual)} {what} arrays "
               f"{'differs' if len(bad) == 1 else 'differ'} from the checksums "
               f"recorded when it was written ({names})" if bad else
               f"its record has no checksum for {len(missing)} of its {len(actual)} {what} "
               f"arrays ({names})"))


_warned_unverified: set = set()


def _warn_unverified(step: int, directory: str) -> None:
    if (directory, step) not in _warned_unverified:
        _warned_unverified.add((directory, step))
        logging.getLogger("rwkv_jax").warning(
            "the checkpoint of step %d in %s was written without checksums (by rwkv_jax before "
            "they were recorded): restored unverified", step, directory)


def cause_line(e: BaseException) -> str:
    """`Type: first line` of the innermost exception a failed orbax call was raised from: the
    outer ones wrap it in a repr of tensorstore's bound methods ("See full TensorStore
    details: <bound method pybind11_detail...")."""
    seen = set()
    while e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    text = str(e).split("See full TensorStore details")[0].strip().rstrip(".")
    first = (text.splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# tensorstore's codes for data that is there but wrong (a checksum or decoding failure), cut
# short, or missing: a damaged checkpoint, where other failures may be a mismatch of the trees.
_DAMAGE_CODES = re.compile(r"^(\w+: )?(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND):")


def damage_error(e: BaseException, step: int, directory: str) -> DamagedCheckpointError | None:
    """The DamagedCheckpointError a failed orbax restore means, if tensorstore says so."""
    cause = cause_line(e)
    if _DAMAGE_CODES.match(cause):
        return DamagedCheckpointError(f"the checkpoint of step {step} in {directory} is damaged "
                                      f"({cause})")
    return None


def write_failure(e: BaseException | None) -> str | None:
    """The file system's reason a save failed ('No space left on device (ENOSPC)'), or None
    when the failure is not the file system's (a bug: it keeps its traceback)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) and e.errno else None
        if code is None and (m := _OS_ERROR_CODE.search(str(e))):
            code = int(m.group(1) or m.group(2))  # tensorstore: "... [os_error_code='28']"
        if code:
            return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
        e = e.__cause__ or e.__context__
    return None


def _in_orbax(exc: BaseException) -> bool:
    return any("orbax" in f.filename for f in traceback.extract_tb(exc.__traceback__))


def _add_filter(logger_name: str, keep) -> None:
    """logging.Filter `keep(record)` on a logger, once per name of `keep`."""
    logger = logging.getLogger(logger_name)
    if not any(getattr(f, "name", None) == keep.__name__ for f in logger.filters):
        f = logging.Filter(keep.__name__)
        f.filter = keep
        logger.addFilter(f)


def quiet_orbax_write_errors() -> None:
    """orbax logs a failed save's exception, traceback and all, from every thread it passes
    through (with asyncio's reports below, 79 tracebacks for one full disk). The first failure
    reaches TrainCheckpointer, which reports it in one line; other orbax errors are still
    logged."""

    def drop_orbax_write_errors(record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or "orbax" not in record.pathname or write_failure(exc) is None

    _add_filter("absl", drop_orbax_write_errors)  # orbax logs through absl.logging


def quiet_abandoned_io() -> None:
    """A restore or save that fails on one array leaves tensorstore's other reads or writes in
    flight, and orbax closes their event loop. asyncio then logs each that failed as well as
    "exception was never retrieved", and each that ends later reports 'Event loop is closed' as
    an unraisable exception: tens of tracebacks before or after the one line that says what
    failed (the first failure, which reached the caller). Only those are dropped."""
    def drop_abandoned_orbax_io(record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # A tensorstore write's future may carry no orbax frame (it failed in C++); its file
        # system error is the one already reported.
        return not (exc is not None and "never retrieved" in record.getMessage()
                    and (_in_orbax(exc) or write_failure(exc) is not None))

    _add_filter("asyncio", drop_abandoned_orbax_io)
    # A write orbax had queued but not begun when the loop closed is garbage collected at exit
    # with this warning (seen under load in CI, after the one line).
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


def _finite_leaves(xs):
    return jnp.stack([jnp.isfinite(x).all() for x in xs])


def check_finite_params(params, where: str) -> None:
    """ValueError naming the first array of `params` that holds a NaN or Inf. One jitted
    reduction on the devices that hold the arrays (nothing is copied to the host)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        return
    finite = jax.jit(_finite_leaves)([x for _, x in leaves])
    bad = [jax.tree_util.keystr(k) for (k, _), ok in zip(leaves, np.asarray(finite)) if not ok]
    if bad:
        raise ValueError(f"{where}: params{bad[0]} holds NaN or Inf values"
                         + (f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else "")
                         + ": it was saved from a run that diverged, or is damaged")
