// Picks and makes the backend: the one place that knows every backend, so kernels/backend.h
// (the interface) depends on none of them.
#pragma once

#include <memory>

#include "common/config.h"
#include "kernels/backend.h"

namespace reattn {

// Makes the backend the config asks for ("auto": cuda when a GPU is visible and the CUDA
// backend was built, else cpu). `local_rank` picks the GPU.
Expected<std::unique_ptr<Backend>> make_backend(const Config& config, int local_rank);

}  // namespace reattn
