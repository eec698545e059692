// Internal: the checks of the sampling options that generate() makes before anything runs.
#pragma once

#include <string>

namespace mamba::detail {

/// A float as printf's %g writes it: "1.5", "0", "-1", "nan", "inf".
std::string number_text(float value);
/// Throws mamba::Error unless penalty is finite and > 0: "repetition_penalty must be a finite number > 0, found -1".
void check_repetition_penalty(float penalty);
/// Throws mamba::Error unless top_p is in (0, 1]: "top_p must be in (0, 1], found 1.5".
void check_top_p(float top_p);

}  // namespace mamba::detail
