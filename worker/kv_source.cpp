#include "worker/kv_source.h"

#include <cmath>
#include <string>
#include <vector>

#include "common/excerpt.h"

namespace reattn {
namespace {

// Strict protocol: a K/V body holds exactly 'k' and 'v', in one dtype.
Status check_kv_tensor_set(const SafetensorsFile& file, const TensorView& k, const TensorView& v) {
  for (const std::string& name : file.names()) {
    if (name != "k" && name != "v") {
      return invalid_argument("unexpected tensor '" + capped(name) + "': a K/V body holds exactly 'k' and 'v'");
    }
  }
  if (k.dtype != v.dtype) {
    return invalid_argument(std::string("tensors 'k' (") + dtype_name(k.dtype) + ") and 'v' (" + dtype_name(v.dtype) +
                            ") differ in dtype; send both in one dtype");
  }
  return Status::ok();
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

Status check_finite(const TensorView& tensor, float max_abs) {
  const int64_t n = tensor.numel();
  constexpr int64_t kPiece = 1 << 16;
  std::vector<float> buf(kPiece);
  const size_t esize = dtype_size(tensor.dtype);
  for (int64_t base = 0; base < n; base += kPiece) {
    const int64_t count = std::min(kPiece, n - base);
    convert_to_f32(tensor.dtype, tensor.data + base * esize, count, buf.data());
    for (int64_t i = 0; i < count; ++i) {
      if (!std::isfinite(buf[i])) {
        return invalid_argument("tensor '" + tensor.name + "' holds a non-finite value (" +
                                std::to_string(buf[i]) + ") at flat index " + std::to_string(base + i));
      }
      if (std::fabs(buf[i]) > max_abs) {
        return invalid_argument("tensor '" + tensor.name + "' holds " + std::to_string(buf[i]) + " at flat index " +
                                std::to_string(base + i) + ", above the f16 storage limit " +
                                std::to_string(static_cast<int>(max_abs)));
      }
    }
  }
  return Status::ok();
}

Expected<SafetensorsKvSource> SafetensorsKvSource::make(const SafetensorsFile& file, const ModelConfig& model,
                                                        float max_abs) {
  SafetensorsKvSource source;
  REATTN_ASSIGN_OR_RETURN(source.k_, file.get("k"));
  REATTN_ASSIGN_OR_RETURN(source.v_, file.get("v"));
  REATTN_RETURN_IF_ERROR(check_kv_tensor_set(file, source.k_, source.v_));
  for (const TensorView* t : {&source.k_, &source.v_}) {
    const auto& s = t->shape;
    if (s.size() != 4 || s[0] != model.layers || s[1] != model.kv_heads || s[3] != model.head_dim) {
      return invalid_argument("tensor '" + t->name + "': shape " + shape_string(s) + " does not match [layers=" +
                              std::to_string(model.layers) + ", kv_heads=" + std::to_string(model.kv_heads) +
                              ", tokens, head_dim=" + std::to_string(model.head_dim) + "]");
    }
  }
  if (source.k_.shape != source.v_.shape) {
    return invalid_argument("tensors 'k' " + shape_string(source.k_.shape) + " and 'v' " +
                            shape_string(source.v_.shape) + " differ in shape");
  }
  if (source.k_.shape[2] < 1) return invalid_argument("tensor 'k': holds no tokens");
  REATTN_RETURN_IF_ERROR(check_finite(source.k_, max_abs));
  REATTN_RETURN_IF_ERROR(check_finite(source.v_, max_abs));
  source.tokens_ = source.k_.shape[2];
  source.kv_heads_ = model.kv_heads;
  source.head_dim_ = model.head_dim;
  return source;
}

void SafetensorsKvSource::read(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const {
  const int64_t first = ((static_cast<int64_t>(layer) * kv_heads_ + kv_head) * tokens_ + offset) * head_dim_;
  convert_to_f32(k_.dtype, k_.data + first * dtype_size(k_.dtype), count * head_dim_, k);
  convert_to_f32(v_.dtype, v_.data + first * dtype_size(v_.dtype), count * head_dim_, v);
}

void SyntheticKvSource::read(int layer, int kv_head, int64_t offset, int64_t count, float* k, float* v) const {
  for (int64_t t = 0; t < count; ++t) {
    synthetic_kv(spec_, model_, layer, kv_head, first_token_ + offset + t, k + t * model_.head_dim,
                 v + t * model_.head_dim);
  }
}

}  // namespace reattn
