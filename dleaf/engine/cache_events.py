"""Following what ``generate`` does to a sequence's key/value cache.

Beam search reorders the rows of the cache between steps (``reorder_cache``), some decoding modes select or repeat
rows (``batch_select_indices``, ``batch_repeat_interleave``) or roll tokens back (``crop``). A method that keeps
state per batch row must do the same to its state, from what ``generate`` does rather than from the cache's
contents. :func:`follow` makes the cache object tell its listeners: it shadows those four methods on that one cache
object (never on its class) with bound wrappers that call the class's own method, then notify every listener
registered for the object. Listeners and caches are held by weak reference; a deep copy of a followed cache calls its
own methods and notifies nobody.
"""

from __future__ import annotations

import contextlib
import types
import weakref

EVENTS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave", "crop")

_LISTENERS: "weakref.WeakKeyDictionary[object, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_MUTED: "weakref.WeakSet" = weakref.WeakSet()


def _wrapper(name: str):
    def notify(self, *args, **kwargs):
        out = getattr(type(self), name)(self, *args, **kwargs)
        if self in _MUTED:
            return out
        for listener in list(_LISTENERS.get(self, ())):
            listener.cache_event(self, name, args, kwargs)
        return out

    notify.__name__ = name
    return notify


_WRAPPERS = {name: _wrapper(name) for name in EVENTS}


def _is_wrapped(cache, name: str) -> bool:
    bound = cache.__dict__.get(name) if hasattr(cache, "__dict__") else None
    return isinstance(bound, types.MethodType) and bound.__func__ is _WRAPPERS[name]


def can_follow(cache) -> bool:
    """Whether ``cache`` can be followed: an object with a ``reorder_cache`` method and an instance dictionary."""
    return cache is not None and hasattr(type(cache), "reorder_cache") and hasattr(cache, "__dict__")


def follow(cache, listener) -> None:
    """Make ``cache`` call ``listener.cache_event(cache, name, args, kwargs)`` after each of :data:`EVENTS`."""
    for name in EVENTS:
        if hasattr(type(cache), name) and not _is_wrapped(cache, name):
            setattr(cache, name, types.MethodType(_WRAPPERS[name], cache))
    listeners = _LISTENERS.get(cache)
    if listeners is None:
        listeners = _LISTENERS[cache] = weakref.WeakSet()
    listeners.add(listener)


def unfollow(cache, listener) -> None:
    listeners = _LISTENERS.get(cache)
    if listeners is not None:
        listeners.discard(listener)


@contextlib.contextmanager
def muted(cache):
    """Calls on ``cache`` inside the block notify nobody (the owner of a cache tidying it after a sequence ended)."""
    _MUTED.add(cache)
    try:
        yield cache
    finally:
        _MUTED.discard(cache)
