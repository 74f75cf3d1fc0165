"""Which GPUs a local replica gets, pure: the machine's devices, what each replica holds,
and what the new one needs (`num_gpus` of its deployment).

    need                 gets
    0                    nothing (its CUDA_VISIBLE_DEVICES is left as the gateway's)
    a fraction (≤ 1)     a share of one device: the fullest device it still fits on (best
                         fit, so fractions pack and whole devices stay free), ties to the
                         lowest index; replicas sharing a device may use at most their share
                         of its memory (the embedding example sets torch's memory fraction)
    an integer n > 1     n devices of its own, nothing else on them, lowest indices first
    does not fit         None: the start fails with the reason (no device is overbooked)

Devices are strings (indices or UUIDs), as CUDA_VISIBLE_DEVICES takes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

EPSILON = 1e-9


def used(held: Mapping[str, Sequence[tuple[str, float]]]) -> dict[str, float]:
    """The share of each device the replicas hold."""
    out: dict[str, float] = {}
    for shares in held.values():
        for device, share in shares:
            out[device] = out.get(device, 0.0) + share
    return out


def assign(need: float, devices: Sequence[str],
           held: Mapping[str, Sequence[tuple[str, float]]]) -> list[tuple[str, float]] | None:
    """The (device, share) pairs a replica needing `need` GPUs gets, or None."""
    if need <= 0:
        return []
    taken = used(held)
    if need <= 1:
        fits = [(1.0 - taken.get(d, 0.0), i, d) for i, d in enumerate(devices)
                if taken.get(d, 0.0) + need <= 1.0 + EPSILON]
        if not fits:
            return None
        _, _, device = min(fits)
        return [(device, need)]
    whole = round(need)
    free = [d for d in devices if taken.get(d, 0.0) <= EPSILON]
    if abs(need - whole) > EPSILON or len(free) < whole:
        return None
    return [(d, 1.0) for d in free[:whole]]
