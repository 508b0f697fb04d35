"""medssl.eval: low-label evaluation of encoders.

Importing the package registers the built-in evaluation protocols in :data:`medssl.eval.registry.PROTOCOLS`:
``linear``, ``knn`` and ``collapse`` (:mod:`medssl.eval.protocol`), ``finetune`` (:mod:`medssl.eval.finetune`) and
``segment`` (:mod:`medssl.eval.segment`). A new protocol is one module that registers itself with
:func:`medssl.eval.registry.register_protocol`, plus its import here.
"""

from medssl.eval import finetune as _finetune  # noqa: F401  (registers "finetune")
from medssl.eval import protocol as _protocol  # noqa: F401  (registers "linear", "knn", "collapse")
from medssl.eval import segment as _segment  # noqa: F401  (registers "segment")
