#include "tests/support/test_util.h"

#include <cmath>
#include <sstream>

#include "src/backend/ref/tensor_access.h"

namespace ringattn::test {

std::string describe(const Case& c) {
  std::ostringstream os;
  os << "B=" << c.B << " N=" << c.N << " H=" << c.H << " Hkv=" << c.Hkv << " D=" << c.D << " s=[";
  for (size_t i = 0; i < c.s.size(); ++i) os << (i ? "," : "") << c.s[i];
  os << "] r=[";
  for (size_t i = 0; i < c.r.size(); ++i) os << (i ? "," : "") << c.r[i];
  os << "] " << mode_name(c.mode) << (c.causal ? " causal " : " full ") << dtype_name(c.dtype)
     << (c.strided ? " strided" : "");
  return os.str();
}

Case random_case(std::mt19937& rng, const std::vector<int64_t>& dims) {
  Case c{};
  c.B = 1 + rng() % 2;
  const int64_t g = 1 + rng() % 3;
  c.Hkv = 1 + rng() % 2;
  c.H = c.Hkv * (1 + rng() % 3);
  if (c.H < g) c.H = c.Hkv * g;
  c.D = dims[rng() % dims.size()];
  const int64_t base = 16 << (rng() % 3);
  for (int64_t i = 0; i < g; ++i) {
    c.s.push_back(base << i);
    c.r.push_back(1 + rng() % std::min<int64_t>(5, base << i));
  }
  c.N = c.s.back() * (1 + rng() % 2);
  c.mode = rng() % 2 ? Mode::kLongNet : Mode::kGroups;
  c.causal = rng() % 2;
  c.strided = rng() % 2;
  return c;
}

Tensor::Tensor(DType dtype, std::vector<int64_t> shape, bool layout_bnh, int64_t pad) {
  const int64_t s0 = shape[0], s1 = shape[1], s2 = shape[2], s3 = shape.size() > 3 ? shape[3] : 1;
  const int64_t row = s3 + pad;  // elements per innermost row, padding included
  int64_t st0, st1, st2;
  if (layout_bnh) {
    st2 = row;
    st1 = s2 * row;
    st0 = s1 * st1;
  } else {
    st1 = row;
    st2 = s1 * row;
    st0 = s2 * st2;
  }
  const int64_t total = s0 * st0;
  data_.assign(static_cast<size_t>(total) * dtype_size(dtype), 0);
  // Poison the padding so a kernel that reads it produces garbage.
  for (int64_t i = 0; i < total; ++i) store_f32(data_.data(), dtype, i, std::nanf(""));
  if (shape.size() > 3) {
    view_ = TensorView::strided(data_.data(), dtype, {s0, s1, s2, s3}, {st0, st1, st2, 1});
  } else {
    view_ = TensorView::strided(data_.data(), dtype, {s0, s1, s2}, {st0, st1, st2});
  }
  fill(0.0f);
}

int64_t Tensor::offset(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
  return i0 * view_.strides[0] + i1 * view_.strides[1] + i2 * view_.strides[2] +
         (view_.ndim > 3 ? i3 * view_.strides[3] : 0);
}

float Tensor::get(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
  return load_f32(view_.data, view_.dtype, offset(i0, i1, i2, i3));
}

void Tensor::set(int64_t i0, int64_t i1, int64_t i2, int64_t i3, float value) {
  store_f32(view_.data, view_.dtype, offset(i0, i1, i2, i3), value);
}

void Tensor::fill_normal(std::mt19937& rng, float stddev) {
  std::normal_distribution<float> dist(0.0f, stddev);
  const int64_t d3 = view_.ndim > 3 ? view_.shape[3] : 1;
  for (int64_t a = 0; a < view_.shape[0]; ++a)
    for (int64_t b = 0; b < view_.shape[1]; ++b)
      for (int64_t c = 0; c < view_.shape[2]; ++c)
        for (int64_t d = 0; d < d3; ++d) set(a, b, c, d, dist(rng));
}

void Tensor::fill(float value) {
  const int64_t d3 = view_.ndim > 3 ? view_.shape[3] : 1;
  for (int64_t a = 0; a < view_.shape[0]; ++a)
    for (int64_t b = 0; b < view_.shape[1]; ++b)
      for (int64_t c = 0; c < view_.shape[2]; ++c)
        for (int64_t d = 0; d < d3; ++d) set(a, b, c, d, value);
}

CaseTensors::CaseTensors(const Case& cs, uint32_t seed)
    : c(cs),
      q(c.dtype, {c.B, c.N, c.H, c.D}, !c.strided, c.strided ? 2 : 0),
      k(c.dtype, {c.B, c.N, c.Hkv, c.D}, !c.strided, c.strided ? 1 : 0),
      v(c.dtype, {c.B, c.N, c.Hkv, c.D}, !c.strided, c.strided ? 3 : 0),
      dout(c.dtype, {c.B, c.N, c.H, c.D}, !c.strided, c.strided ? 1 : 0),
      out(c.dtype, {c.B, c.N, c.H, c.D}, !c.strided, c.strided ? 2 : 0),
      lse(DType::kF32, {c.B, c.H, c.N}, true, c.strided ? 1 : 0),
      dq(c.dtype, {c.B, c.N, c.H, c.D}, !c.strided, c.strided ? 1 : 0),
      dk(c.dtype, {c.B, c.N, c.Hkv, c.D}, !c.strided, c.strided ? 2 : 0),
      dv(c.dtype, {c.B, c.N, c.Hkv, c.D}, !c.strided, c.strided ? 1 : 0) {
  std::mt19937 rng(seed);
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  dout.fill_normal(rng);
}

BackwardProblem CaseTensors::problem() const {
  return make_backward_problem(c.config(), dout.view(), q.view(), k.view(), v.view(), out.view(),
                               lse.view(), dq.view(), dk.view(), dv.view(), 1 << 20, "reference");
}

TensorView rows_of(const Tensor& t, int64_t row0, int64_t rows, int seq_dim) {
  TensorView v = t.view();
  v.data = static_cast<uint8_t*>(v.data) +
           static_cast<size_t>(row0 * v.strides[seq_dim]) * dtype_size(v.dtype);
  v.shape[seq_dim] = rows;
  return v;
}

void expect_error(const std::function<void()>& fn, ErrorCode code,
                  std::initializer_list<const char*> words) {
  try {
    fn();
    ADD_FAILURE() << "no error was raised";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const char* w : words)
      EXPECT_NE(std::string(e.what()).find(w), std::string::npos)
          << "message lacks '" << w << "': " << e.what();
  }
}

std::vector<double> to_double(const Tensor& x) {
  const TensorView v = x.view();
  std::vector<double> out;
  out.reserve(static_cast<size_t>(v.numel()));
  for (int64_t a = 0; a < v.shape[0]; ++a)
    for (int64_t b = 0; b < v.shape[1]; ++b)
      for (int64_t c = 0; c < v.shape[2]; ++c)
        for (int64_t d = 0; d < v.shape[3]; ++d) out.push_back(x.get(a, b, c, d));
  return out;
}

namespace {

void accumulate(Stats& s, double x, double ref, double clearly_nonzero = kClearlyNonZero) {
  ++s.count;
  if (x != 0.0) ++s.nonzero;
  if (ref != 0.0) ++s.ref_nonzero;
  if (x == 0.0 && std::abs(ref) > clearly_nonzero) ++s.missing;
  if (std::isfinite(ref)) {
    s.max_ref = std::max(s.max_ref, std::abs(ref));
    if (!std::isfinite(x)) {
      ++s.nonfinite;
    } else {
      s.max_abs_err = std::max(s.max_abs_err, std::abs(x - ref));
    }
  } else if (x != ref) {
    ++s.nonfinite;  // ref is -inf (empty row) and x is not
  }
}

}  // namespace

Stats compare_bnhd(const Tensor& x, const std::vector<double>& ref, double clearly_nonzero) {
  Stats s;
  const std::vector<double> xs = to_double(x);
  for (size_t i = 0; i < xs.size(); ++i) accumulate(s, xs[i], ref[i], clearly_nonzero);
  return s;
}

Stats compare_lse(const Tensor& x, const std::vector<double>& ref) {
  Stats s;
  const TensorView v = x.view();
  size_t i = 0;
  for (int64_t a = 0; a < v.shape[0]; ++a)
    for (int64_t b = 0; b < v.shape[1]; ++b)
      for (int64_t c = 0; c < v.shape[2]; ++c) accumulate(s, x.get(a, b, c), ref[i++]);
  return s;
}

}  // namespace ringattn::test
