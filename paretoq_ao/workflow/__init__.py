"""The workflow wing of paretoq_ao: everything around the core that trains, loads, evaluates and
runs models -- the QAT recipe (``recipe`` and the modules it gathers: ``settings``, ``models``,
``checkpoints``, ``train``, ``convert``, ``demo``), Hugging Face integration (``hf``), text data
(``data``), evaluation (``evaluate``), FSDP2 / DCP (``distributed``), generation (``generate``), the
CLI (``cli``) and the example (``example``).

Imports point one way: the wing imports the core (``paretoq_ao.formats``, ``quant``, ``packing``,
``ops``, ``qat``, ``packed``, ``size``, ``serialization``), never the reverse, and ``import paretoq_ao``
loads none of this (nor transformers or datasets). Importing this package imports nothing either;
import the module you need. The old names (``paretoq_ao.hf``, ``paretoq_ao.recipe``, ``paretoq_ao.data``,
...) keep working: each is a short alias file that makes the old name the *same module object* as
the one here (so patching one patches the other).
"""
