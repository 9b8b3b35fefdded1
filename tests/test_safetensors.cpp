#include "common/safetensors.h"
#include "common/tensor_checks.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

namespace reattn {
namespace {

// A blob with a hand-written header, so tests can say exactly what is malformed.
std::string blob(const std::string& header, const std::string& data = "", uint64_t header_len = UINT64_MAX) {
  if (header_len == UINT64_MAX) header_len = header.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header_len >> (8 * i)) & 0xff);
  return out + header + data;
}

// The parse fails with InvalidArgument, the message starts with the origin and names `what`.
::testing::AssertionResult rejects(const std::string& bytes, const std::string& what) {
  auto file = SafetensorsFile::parse(bytes);
  if (file.is_ok()) return ::testing::AssertionFailure() << "parsed, expected an error naming '" << what << "'";
  const Status& s = file.status();
  if (s.code() != ErrorCode::kInvalidArgument || s.message().rfind("<body>: ", 0) != 0 ||
      s.message().find(what) == std::string::npos) {
    return ::testing::AssertionFailure() << "got " << s.to_string() << ", expected '" << what << "'";
  }
  return ::testing::AssertionSuccess();
}

std::vector<float> test_values(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// What a value reads back as after storage in `dtype`.
float stored(DType dtype, float x) {
  if (dtype == DType::kF16) return f16_to_float(float_to_f16(x));
  if (dtype == DType::kBF16) return bf16_to_float(float_to_bf16(x));
  return x;
}

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "reattn_st_" + std::to_string(getpid()) + "_" + name;
}

class RoundTrip : public ::testing::TestWithParam<DType> {};

TEST_P(RoundTrip, ValuesShapesAndOrderSurvive) {
  const DType dtype = GetParam();
  const auto k = test_values(2 * 3 * 5, 1), v = test_values(7, 2), s = test_values(1, 3);
  const std::string bytes = serialize_safetensors({make_tensor("z_k", dtype, {2, 3, 5}, k),
                                                   make_tensor("a_v", dtype, {7}, v),
                                                   make_tensor("scalar", dtype, {}, s),
                                                   make_tensor("empty", dtype, {0, 4}, {})});
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(header_len % 8, 0u);
  const std::string header = bytes.substr(8, header_len);
  EXPECT_LT(header.find("\"z_k\""), header.find("\"a_v\"")) << "tensors must keep the given order: " << header;

  auto file = SafetensorsFile::parse(bytes);
  ASSERT_TRUE(file.is_ok()) << file.status().to_string();
  EXPECT_EQ(file->names(), (std::vector<std::string>{"a_v", "empty", "scalar", "z_k"}));
  for (const auto& [name, shape, values] :
       {std::make_tuple("z_k", std::vector<int64_t>{2, 3, 5}, k), std::make_tuple("a_v", std::vector<int64_t>{7}, v),
        std::make_tuple("scalar", std::vector<int64_t>{}, s), std::make_tuple("empty", std::vector<int64_t>{0, 4}, std::vector<float>{})}) {
    auto t = file->get(name);
    ASSERT_TRUE(t.is_ok()) << t.status().to_string();
    EXPECT_EQ(t->dtype, dtype);
    EXPECT_EQ(t->shape, shape);
    EXPECT_EQ(t->numel(), static_cast<int64_t>(values.size()));
    EXPECT_EQ(t->bytes, values.size() * dtype_size(dtype));
    const auto got = t->to_f32();
    ASSERT_EQ(got.size(), values.size());
    for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(got[i], stored(dtype, values[i])) << name << "[" << i << "]";
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RoundTrip, ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const auto& p) { return std::string(dtype_name(p.param)); });

TEST(Safetensors, OpenMapsAWrittenFile) {
  const std::string path = temp_path("open.safetensors");
  const auto values = test_values(33, 4);
  ASSERT_TRUE(write_file(path, serialize_safetensors({make_tensor("w", DType::kBF16, {3, 11}, values)})).is_ok());
  auto opened = SafetensorsFile::open(path);
  ASSERT_EQ(unlink(path.c_str()), 0);  // the mapping outlives the directory entry
  ASSERT_TRUE(opened.is_ok()) << opened.status().to_string();
  // Views stay valid while any copy of the file holds the mapping.
  const SafetensorsFile copy = *opened;
  opened = Status(invalid_argument("dropped"));
  auto t = copy.get("w");
  ASSERT_TRUE(t.is_ok());
  const auto got = t->to_f32();
  ASSERT_EQ(got.size(), values.size());
  for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(got[i], stored(DType::kBF16, values[i]));

  auto missing = copy.get("x");
  EXPECT_EQ(missing.status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(missing.status().message(), "tensor 'x' not found in " + path + " (it has: w)");
}

// The header alone (pread; the data section neither read nor mapped): the same shapes,
// dtypes and offsets as open(), views without data, and the same refusals, by path.
TEST(Safetensors, OpenHeaderReadsTheHeaderOnly) {
  const std::string path = temp_path("header.safetensors");
  const std::string blob = serialize_safetensors({make_tensor("a", DType::kF16, {2, 5}, test_values(10, 1)),
                                                  make_tensor("b", DType::kF32, {7}, test_values(7, 2))});
  ASSERT_TRUE(write_file(path, blob).is_ok());
  Expected<SafetensorsFile> mapped = SafetensorsFile::open(path);
  Expected<SafetensorsFile> header = SafetensorsFile::open_header(path);
  ASSERT_TRUE(mapped.is_ok() && header.is_ok()) << header.status().to_string();
  for (const char* name : {"a", "b"}) {
    const TensorView m = *mapped->get(name), h = *header->get(name);
    EXPECT_EQ(h.shape, m.shape) << name;
    EXPECT_EQ(h.dtype, m.dtype) << name;
    EXPECT_EQ(h.bytes, m.bytes) << name;
    EXPECT_EQ(h.data, nullptr) << name;
    EXPECT_EQ(header->offset_of(h), mapped->offset_of(m)) << name;
    // The offset is where the tensor's bytes are in the file.
    EXPECT_EQ(std::memcmp(blob.data() + header->offset_of(h), m.data, m.bytes), 0) << name;
  }
  // Cut short in the data section: refused as open() refuses it, naming the path.
  ASSERT_TRUE(write_file(path, blob.substr(0, blob.size() - 4)).is_ok());
  const Status cut = SafetensorsFile::open_header(path).status();
  EXPECT_EQ(cut.message().rfind(path + ": ", 0), 0u) << cut.message();
  EXPECT_NE(cut.message().find("past the data section"), std::string::npos) << cut.message();
  for (const auto& [bytes, what] : {std::pair<std::string, std::string>{"", "empty file"}, {"abcde", "truncated"}}) {
    ASSERT_TRUE(write_file(path, bytes).is_ok());
    EXPECT_NE(SafetensorsFile::open_header(path).status().message().find(what), std::string::npos) << what;
  }
  unlink(path.c_str());
  EXPECT_NE(SafetensorsFile::open_header(path).status().message().find("No such file"), std::string::npos);
}

TEST(Safetensors, OpenReportsMissingFileAndShortFile) {
  const std::string missing = temp_path("does_not_exist.safetensors");
  auto f = SafetensorsFile::open(missing);
  ASSERT_FALSE(f.is_ok());
  EXPECT_EQ(f.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(f.status().message(), "cannot open '" + missing + "': No such file or directory");

  const std::string dir_error = SafetensorsFile::open(::testing::TempDir()).status().message();
  EXPECT_NE(dir_error.find("not a regular file"), std::string::npos) << dir_error;

  const std::string path = temp_path("short.safetensors");
  for (const auto& [bytes, what] : {std::pair<std::string, std::string>{"", "empty file"}, {"abcde", "truncated"}}) {
    ASSERT_TRUE(write_file(path, bytes).is_ok());
    auto short_file = SafetensorsFile::open(path);
    ASSERT_FALSE(short_file.is_ok());
    EXPECT_EQ(short_file.status().message().rfind(path + ": ", 0), 0u) << short_file.status().message();
    EXPECT_NE(short_file.status().message().find(what), std::string::npos) << short_file.status().message();
  }
  unlink(path.c_str());
}

TEST(Safetensors, WriteFileNamesThePath) {
  const std::string path = temp_path("no_such_dir/x.safetensors");
  const Status s = write_file(path, "x");
  ASSERT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("'" + path + "'"), std::string::npos) << s.message();
}

TEST(Safetensors, MetadataIsIgnoredAndOriginIsUsed) {
  auto f = SafetensorsFile::parse(
      blob(R"({"__metadata__":{"format":"pt"},"k":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
           std::string(4, '\0')));
  ASSERT_TRUE(f.is_ok()) << f.status().to_string();
  EXPECT_EQ(f->names(), std::vector<std::string>{"k"});
  EXPECT_FALSE(f->has("__metadata__"));
  const auto bad = SafetensorsFile::parse("abc", "request 7");
  EXPECT_EQ(bad.status().message().rfind("request 7: ", 0), 0u) << bad.status().message();
}

TEST(Safetensors, GetMissingNameListsTheTensors) {
  auto f = SafetensorsFile::parse(serialize_safetensors(
      {make_tensor("v", DType::kF16, {1}, {1.0f}), make_tensor("k", DType::kF16, {1}, {2.0f})}));
  ASSERT_TRUE(f.is_ok());
  auto t = f->get("x");
  ASSERT_FALSE(t.is_ok());
  EXPECT_EQ(t.status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(t.status().message(), "tensor 'x' not found in <body> (it has: k, v)");
}

const std::string k_header = R"({"k":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

TEST(SafetensorsMalformed, TruncatedFile) {
  EXPECT_TRUE(rejects("", "empty file"));
  EXPECT_TRUE(rejects("1234567", "truncated: 7 bytes"));
  // Every strict prefix of a valid blob is rejected, never read past its end.
  const std::string full = blob(k_header, std::string(8, '\1'));
  ASSERT_TRUE(SafetensorsFile::parse(full).is_ok());
  for (size_t n = 0; n < full.size(); ++n) EXPECT_FALSE(SafetensorsFile::parse(full.substr(0, n)).is_ok()) << n;
  EXPECT_TRUE(rejects(full.substr(0, full.size() - 1), "past the data section"));
}

TEST(SafetensorsMalformed, HeaderLengthTooLarge) {
  EXPECT_TRUE(rejects(blob(k_header, std::string(8, '\0'), k_header.size() + 9), "exceeds the file"));
  EXPECT_TRUE(rejects(blob("{}", "", UINT64_MAX - 1), "header length"));
  // Larger than the limit even though the file is large enough.
  EXPECT_TRUE(rejects(blob("{}", std::string((100u << 20) + 1, ' '), (100u << 20) + 1), "100 MiB"));
}

TEST(SafetensorsMalformed, BadJson) {
  EXPECT_TRUE(rejects(blob(R"({"k": {"dtype": )"), "not valid JSON"));
  EXPECT_TRUE(rejects(blob(""), "not valid JSON"));
  EXPECT_TRUE(rejects(blob("[1, 2]"), "header is not a JSON object"));
  EXPECT_TRUE(rejects(blob(R"({"k": 3})"), "tensor 'k': entry is not a JSON object"));
  EXPECT_TRUE(rejects(blob(std::string(100000, '[') + std::string(100000, ']')), "nests deeper than 16 levels"));
}

// The header's shape is bounded before a DOM is built: a DOM costs tens of bytes per value,
// so a 64 MiB /kv body (or a load file) of "[" took gigabytes of rank 0's memory to refuse.
TEST(SafetensorsMalformed, HeadersThatWouldTakeGigabytesAreRefusedFirst) {
  EXPECT_TRUE(rejects(blob(std::string(8 << 20, '[')), "header nests deeper than 16 levels"));
  std::string flat = "[";
  for (int i = 0; i < (8 << 20) + 1; ++i) flat += "0,";
  flat += "0]";
  EXPECT_TRUE(rejects(blob(flat), "header holds more than 8388608 JSON values"));
  // Depth 16 exactly is only parsed (and then refused as no object of tensors).
  EXPECT_TRUE(rejects(blob(std::string(16, '[') + std::string(16, ']')), "header is not a JSON object"));
}

TEST(SafetensorsMalformed, MissingFields) {
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[2]}})", std::string(8, '\0')),
                      "tensor 'k': missing 'data_offsets'"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')),
                      "tensor 'k': missing 'dtype'"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", std::string(8, '\0')),
                      "tensor 'k': 'shape' is not an array"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", std::string(8, '\0')),
                      "tensor 'k': 'data_offsets' must be [begin, end]"));
}

// A client value nested far deeper than any stack allows is described, never serialized:
// the error names the field and stays short (the parser itself is iterative).
TEST(SafetensorsMalformed, DeeplyNestedValuesAreDescribedNotSerialized) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    std::string entry = R"("dtype":"F32","shape":[2],"data_offsets":[0,8])";
    const std::string key = std::string("\"") + field + "\":";
    const size_t at = entry.find(key) + key.size();
    const size_t end = std::string(field) == "dtype" ? entry.find(',', at) : entry.find(']', at) + 1;
    entry.replace(at, end - at, deep);
    auto file = SafetensorsFile::parse(blob("{\"k\":{" + entry + "}}", std::string(8, '\0')));
    ASSERT_FALSE(file.is_ok()) << field;
    EXPECT_NE(file.status().message().find("nests deeper than 16 levels"), std::string::npos) << file.status().message();
    EXPECT_LT(file.status().message().size(), 400u) << field;
  }
  const std::string long_dtype = R"({"k":{"dtype":")" + std::string(1 << 20, 'x') + R"(","shape":[2],"data_offsets":[0,8]}})";
  auto file = SafetensorsFile::parse(blob(long_dtype, std::string(8, '\0')));
  ASSERT_FALSE(file.is_ok());
  EXPECT_LT(file.status().message().size(), 400u);
}

TEST(SafetensorsMalformed, NegativeOrNonIntegerDims) {
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})"), "tensor 'k': shape [-1] has a negative"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[1.5],"data_offsets":[0,0]}})"), "non-integer dim"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})"), "non-negative integers"));
}

TEST(SafetensorsMalformed, UnknownDtype) {
  auto f = SafetensorsFile::parse(blob(R"({"k":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", std::string(8, '\0')));
  ASSERT_FALSE(f.is_ok());
  EXPECT_EQ(f.status().message(), "<body>: tensor 'k': unknown dtype 'I64' (expected F32, F16 or BF16)");
  // The config spelling is not the file format's.
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"bf16","shape":[1],"data_offsets":[0,2]}})", "xx"), "unknown dtype 'bf16'"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":7,"shape":[1],"data_offsets":[0,2]}})", "xx"), "unknown dtype '7'"));
}

TEST(SafetensorsMalformed, OffsetsOutOfRange) {
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(7, '\0')),
                      "tensor 'k': data_offsets end 8 is past the data section (7 bytes)"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", std::string(8, '\0')),
                      "tensor 'k': data_offsets begin 8 > end 4"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[0],"data_offsets":[0,18446744073709551615]}})"),
                      "non-negative integers"));
}

TEST(SafetensorsMalformed, SizeMismatch) {
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", std::string(8, '\0')),
                      "tensor 'k': data_offsets span 4 bytes but shape [2] of F32 needs 8 bytes"));
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,4]}})", std::string(8, '\0')),
                      "needs 8 bytes"));
}

TEST(SafetensorsMalformed, NumelOverflow) {
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
                      "tensor 'k': shape [4294967296,4294967296] overflows numel"));
  // Fits int64 as a count but not as bytes: a size mismatch, not a wrap-around to a small size.
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
                      "more than the file holds"));
  // A zero dim does not excuse the others overflowing.
  EXPECT_TRUE(rejects(blob(R"({"k":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})"),
                      "overflows numel"));
}

TEST(SafetensorsMalformed, OverlappingTensors) {
  EXPECT_TRUE(rejects(blob(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                           std::string(12, '\0')),
                      "tensors 'a' and 'b' overlap"));
  // Empty tensors take no bytes, so they overlap nothing.
  EXPECT_TRUE(SafetensorsFile::parse(blob(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                          R"("b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                                          std::string(8, '\0')))
                  .is_ok());
}

TEST(SafetensorsMalformed, RandomCorruptionNeverCrashes) {
  const std::string valid = serialize_safetensors(
      {make_tensor("k", DType::kF16, {3, 5}, test_values(15, 5)), make_tensor("v", DType::kF32, {4}, test_values(4, 6))});
  std::mt19937 rng(9);
  for (int i = 0; i < 5000; ++i) {
    std::string bytes = valid;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int j = 0; j < flips; ++j) bytes[rng() % bytes.size()] = static_cast<char>(rng());
    auto f = SafetensorsFile::parse(bytes);
    if (!f.is_ok()) continue;
    // Whatever parsed must be readable within the blob.
    for (const auto& name : f->names()) {
      auto t = f->get(name);
      ASSERT_TRUE(t.is_ok());
      EXPECT_EQ(t->to_f32().size(), static_cast<size_t>(t->numel()));
    }
  }
}

// check_storable against the plain per-value rule (finite and |x| <= max_abs) for every bf16 and
// f16 pattern and a spread of f32 ones, with the bad value placed at every offset of a block.
TEST(TensorChecks, StorableMatchesThePlainRule) {
  std::mt19937 rng(3);
  std::vector<uint32_t> f32_bits = {0u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0x7F7FFFFFu, 0x477FE000u,
                                    0x477FE001u, 0x47800000u, 0x3FC00000u, 0x3FC00001u};
  for (int i = 0; i < 4000; ++i) f32_bits.push_back(rng());
  for (float max_abs : {65504.0f, std::numeric_limits<float>::max(), 1.5f}) {
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      const size_t esize = dtype == DType::kF32 ? 4 : 2;
      const size_t patterns = dtype == DType::kF32 ? f32_bits.size() : 65536;
      for (size_t p = 0; p < patterns; ++p) {
        const uint32_t bits = dtype == DType::kF32 ? f32_bits[p] : static_cast<uint32_t>(p);
        float value;
        if (dtype == DType::kF32) {
          std::memcpy(&value, &bits, 4);
        } else {
          value = dtype == DType::kBF16 ? bf16_to_float(static_cast<uint16_t>(bits)) : f16_to_float(static_cast<uint16_t>(bits));
        }
        const bool storable = std::isfinite(value) && std::fabs(value) <= max_abs;
        // 300 zeros (more than one block), the pattern at a position that moves with p.
        std::vector<unsigned char> data(300 * esize, 0);
        const size_t at = p % 300;
        std::memcpy(data.data() + at * esize, &bits, esize);
        TensorView t{"x", dtype, {300}, data.data(), data.size()};
        const Status s = check_storable(t, max_abs);
        ASSERT_EQ(s.is_ok(), storable) << dtype_name(dtype) << " bits " << bits << " max_abs " << max_abs;
        if (!storable) {
          ASSERT_NE(s.message().find("flat index " + std::to_string(at)), std::string::npos) << s.message();
        }
      }
    }
  }
}

}  // namespace
}  // namespace reattn
