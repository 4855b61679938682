"""Generate ``csrc/formats_table.h``, the C++ copy of the format table, from ``paretoq_ao.formats``.

The header is committed (so that the C++ library also builds by hand with CMake) and a test checks
that it is exactly what this module renders from formats.py, so the two can never drift apart.

    python -m paretoq_ao.export._formats_gen        # rewrite the header after editing formats.py
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from paretoq_ao.formats import FORMATS, SCALE_EPS

# formats.BitFormat.storage -> the C++ enum value (paretoq_kernels.h: kRowBits, kTrits5)
STORAGE = {"rowbits": 0, "trits5": 1}

HEADER = Path(__file__).resolve().parent / "csrc" / "formats_table.h"


def _f32(v: float) -> str:
    """A C++ float literal that parses to exactly float32(v)."""
    (f,) = struct.unpack("<f", struct.pack("<f", v))
    return f"{f!r}f"


def render() -> str:
    rows = []
    for fmt in FORMATS.values():
        rows.append(f"    {{{float(fmt.bits)!r}, {fmt.code_bits}, {fmt.n_codes}, {_f32(fmt.zero)}, {_f32(fmt.step)}, "
                    f"{STORAGE[fmt.storage]}}},"
                    f"  // {fmt}")
    body = "\n".join(rows)
    return f"""// GENERATED from paretoq_ao/formats.py by paretoq_ao/export/_formats_gen.py -- do not edit.
// Regenerate: python -m paretoq_ao.export._formats_gen   (tests/test_export_kernels.py checks it)
#pragma once

namespace paretoq {{

struct FormatEntry {{
  double bits;    // user-facing bit width (1, 1.58, 2, 3, 4)
  int code_bits;  // width of a code field in the rowbits layout
  int n_codes;    // number of valid codes (3 for ternary)
  float zero;     // code of the level 0 (2 * zero is an integer)
  float step;     // distance between normalised levels
  int storage;    // packed layout: 0 rowbits (code_bits-wide fields), 1 trits5 (5 trits per byte)
}};

// Scales are clamped below at this value (formats.SCALE_EPS).
constexpr float kScaleEps = {_f32(SCALE_EPS)};

constexpr FormatEntry kFormats[] = {{
{body}
}};

}}  // namespace paretoq
"""


def main() -> int:
    text = render()
    if HEADER.exists() and HEADER.read_text() == text:
        print(f"{HEADER} is up to date")
        return 0
    HEADER.write_text(text)
    print(f"wrote {HEADER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
