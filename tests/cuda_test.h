// What the one-GPU CUDA tests share: they skip where no GPU is visible.
#pragma once

#include <gtest/gtest.h>

#include "kernels/cuda/cuda_backend.h"

#define SKIP_WITHOUT_GPU()                                                          \
  do {                                                                              \
    if (reattn::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)
