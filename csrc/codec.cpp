// Placeholder: replaced by the int-k codec (issue 3).
#include "pgolf.h"
namespace pgolf {
void bind_codec(pybind11::module_& m) { (void)m; }
}  // namespace pgolf
