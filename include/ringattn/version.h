#pragma once

namespace ringattn {

// "major.minor.patch" of this build.
const char* version();

}  // namespace ringattn
