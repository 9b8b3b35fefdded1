// The one mapping from run-time storage dtype and head_dim to the kernels' template
// arguments, shared by every launcher. Unknown values are errors naming the operation and the
// value, never a fallback.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>

#include "common/dtype.h"
#include "common/status.h"

namespace reattn::cuda {

template <typename T>
struct ElementTag {
  using type = T;
};
template <int D>
using HeadDimTag = std::integral_constant<int, D>;

// Calls fn(HeadDimTag<D>) for D = head_dim (64 or 128).
template <typename Fn>
Status dispatch_head_dim(int head_dim, const char* what, Fn&& fn) {
  if (head_dim == 128) return fn(HeadDimTag<128>{});
  if (head_dim == 64) return fn(HeadDimTag<64>{});
  return invalid_argument(std::string(what) + ": head_dim " + std::to_string(head_dim) +
                          " is not supported by the cuda backend (64 or 128)");
}

// Calls fn(ElementTag<T>, HeadDimTag<D>) with T the storage element (__nv_bfloat16 or __half).
template <typename Fn>
Status dispatch_dtype_head_dim(DType dtype, int head_dim, const char* what, Fn&& fn) {
  if (dtype != DType::kBF16 && dtype != DType::kF16) {
    return invalid_argument(std::string(what) + ": storage dtype must be bf16 or f16");
  }
  return dispatch_head_dim(head_dim, what, [&](auto dim) {
    return dtype == DType::kBF16 ? fn(ElementTag<__nv_bfloat16>{}, dim) : fn(ElementTag<__half>{}, dim);
  });
}

}  // namespace reattn::cuda
