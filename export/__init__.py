"""ExecuTorch export and the C++ low-bit kernel library (installed as ``paretoq_ao.export``).

Not implemented yet.
"""
