"""Lazy import hook: import ``optimum_lrpq`` as soon as transformers' modeling code has been imported.

transformers has no plugin auto-discovery; its quantization registry is filled only by import side effects. An
``lrpq`` checkpoint loaded in a process that never imported ``optimum_lrpq`` would silently load as a float model
whose weights are the integer codes. To prevent that, the package installs ``optimum_lrpq_autoload.pth`` into
site-packages; its single line ``import optimum_lrpq_autoload`` runs this module at every interpreter start (except
under ``python -S``).

Cost at startup: nothing is imported beyond ``sys``/``os`` (already loaded by ``site``); a small finder is put at the
front of ``sys.meta_path``. It ignores every module outside the ``transformers`` and ``optimum_lrpq`` packages. For
their modules it returns the normal spec with its loader wrapped, so it sees when each of them has finished
executing.

Trigger: ``transformers.modeling_utils`` (every ``from_pretrained`` goes through it),
``transformers.models.auto.modeling_auto`` (``from transformers import AutoModelFor...``, which in transformers 5.x
does not import ``modeling_utils`` yet) or ``transformers.quantizers.auto`` (the registries themselves) has executed.
The plugin is then imported — registering the ``lrpq`` config, quantizer and attention function — as soon as no
``transformers`` (or ``optimum_lrpq``) module is still half executed. Waiting for that matters: ``from transformers
import ViTModel`` imports ``modeling_utils`` from inside ``modeling_vit``; importing the plugin at that moment would
break any ``from transformers import ViT...`` in the plugin (partially initialised module). After firing, the finder
removes itself, so later imports are untouched. torch is therefore imported only by processes that import
transformers' modeling code (or its quantizer registry) anyway.

Registration: ``import optimum_lrpq`` itself is light (no torch, no transformers, so that the command line starts at
once); when the hook fires, it imports the plugin if needed and calls ``optimum_lrpq.register()``. The plugin's
import calls ``arm()``: registration right away if transformers' modeling code is already loaded, else this finder
(installed now if it is not there, whatever the switch below says, since the plugin itself asks for it). The finder
also counts the plugin's own modules while they execute, so that registration never runs while one of them is
half executed (``from optimum_lrpq import LRPQuantizer`` imports transformers' modeling code on its way).

Set ``OPTIMUM_LRPQ_NO_AUTOLOAD=1`` to disable the hook at interpreter start (an explicit ``import optimum_lrpq``
still registers). A failure while importing or registering the plugin never breaks the transformers import that
triggered it; it is reported as a ``RuntimeWarning``.
"""

import os
import sys

_PACKAGE = "transformers"
_PLUGIN = "optimum_lrpq"
# Modules whose execution the finder counts: transformers', and the plugin's own.
_WATCHED = (_PACKAGE, _PLUGIN)
_TRIGGERS = frozenset({"transformers.modeling_utils", "transformers.models.auto.modeling_auto",
                       "transformers.quantizers.auto"})
_DISABLE_ENV = "OPTIMUM_LRPQ_NO_AUTOLOAD"


def _import_plugin():
    """Import the plugin if needed and call its ``register()``; warn instead of raising."""
    try:
        plugin = sys.modules.get(_PLUGIN)
        if plugin is None:
            __import__(_PLUGIN)
            plugin = sys.modules[_PLUGIN]
        register = getattr(plugin, "register", None)
        if callable(register):
            register()
    except Exception as exc:  # noqa: BLE001 - must never break the user's `import transformers...`
        import warnings

        warnings.warn(
            f"optimum_lrpq_autoload: importing {_PLUGIN!r} failed ({exc!r}); lrpq-quantized checkpoints will not "
            f"load correctly unless `import {_PLUGIN}` succeeds before `from_pretrained`.",
            RuntimeWarning,
            stacklevel=2,
        )


class _Loader:
    """Wraps the real loader of one ``transformers`` module to observe the end of its execution.

    It puts the real loader back on the spec and the module before delegating, so the imported module is
    indistinguishable from a normal import (``__loader__``, ``__spec__.loader``). Shared loaders are not modified.
    """

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name):  # anything else (get_source, get_resource_reader, ...) goes to the real loader
        if name in {"_loader", "_finder"}:  # not set yet (copy/pickle): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec):
        create_module = getattr(self._loader, "create_module", None)
        return None if create_module is None else create_module(spec)

    def exec_module(self, module):
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._finder._executing += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._finder._executing -= 1
        self._finder._executed(module.__name__)


class _AutoloadFinder:
    """``sys.meta_path`` finder that never finds a module itself; see the module docstring."""

    _optimum_lrpq_autoload = True  # marker, so that a second installation recognises an existing finder

    def __init__(self):
        self._executing = 0  # watched modules currently executing (nested imports, or other threads)
        self._triggered = False

    def find_spec(self, fullname, path=None, target=None):
        if not any(fullname == package or fullname.startswith(package + ".") for package in _WATCHED):
            return None
        spec = None
        for finder in list(sys.meta_path):  # the finders behind this one, as the import system would ask them
            if finder is self or getattr(finder, "_optimum_lrpq_autoload", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is not None:
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, self)
        return spec

    def _executed(self, name):
        if name in _TRIGGERS:
            self._triggered = True
        if self._triggered and self._executing == 0:
            self._uninstall()
            _import_plugin()

    def _uninstall(self):
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def arm():
    """Make sure the plugin registers with transformers: now if transformers' modeling code is loaded, else as soon
    as it is. Called by the plugin's own import, so the ``OPTIMUM_LRPQ_NO_AUTOLOAD`` switch does not apply."""
    _install(respect_switch=False)


def _install(respect_switch=True):
    if respect_switch and os.environ.get(_DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    if any(name in sys.modules for name in _TRIGGERS):
        # transformers' modeling code is already loaded (this module was imported late): register right away.
        _import_plugin()
        return
    if any(getattr(finder, "_optimum_lrpq_autoload", False) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _AutoloadFinder())


_install()
