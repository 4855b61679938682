// GENERATED from paretoq_ao/formats.py by paretoq_ao/export/_formats_gen.py -- do not edit.
// Regenerate: python -m paretoq_ao.export._formats_gen   (tests/test_export_kernels.py checks it)
#pragma once

namespace paretoq {

struct FormatEntry {
  double bits;    // user-facing bit width (1, 1.58, 2, 3, 4)
  int code_bits;  // width of a code field in the rowbits layout
  int n_codes;    // number of valid codes (3 for ternary)
  float zero;     // code of the level 0 (2 * zero is an integer)
  float step;     // distance between normalised levels
  int storage;    // packed layout: 0 rowbits (code_bits-wide fields), 1 trits5 (5 trits per byte)
};

// Scales are clamped below at this value (formats.SCALE_EPS).
constexpr float kScaleEps = 9.999999747378752e-06f;

constexpr FormatEntry kFormats[] = {
    {1.0, 1, 2, 0.5f, 2.0f, 0},  // 1-bit binary
    {1.58, 2, 3, 1.0f, 0.6666666865348816f, 1},  // 1.58-bit SEQ
    {2.0, 2, 4, 1.5f, 0.5f, 0},  // 2-bit SEQ
    {3.0, 3, 8, 4.0f, 1.0f, 0},  // 3-bit LSQ
    {4.0, 4, 16, 8.0f, 1.0f, 0},  // 4-bit LSQ
};

}  // namespace paretoq
