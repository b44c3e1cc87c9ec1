// ringattn._C: the library's entry points over DLPack arrays. No libtorch: torch tensors
// (and numpy arrays) arrive through nanobind's ndarray, the torch layer is Python
// (ringattn/ops.py). Outputs are allocated by the caller and written here; the GIL is released
// while the library runs (a Python communicator takes it back for each of its calls).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "python/src/python_communicator.h"
#include "python/src/tensors.h"
#include "ringattn/ringattn.h"
#include "src/base/agreement.h"
#include "src/base/check.h"
#if defined(RINGATTN_HAVE_MPI)
#include "ringattn/comm_mpi.h"
#endif
#if defined(RINGATTN_HAVE_NCCL)
#include "ringattn/comm_nccl.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace ringattn::python {

namespace {

// The Python exception classes, one per ErrorCode (made in NB_MODULE below).
constexpr int kErrorKinds = static_cast<int>(ErrorCode::kOutOfMemory) + 1;
PyObject* error_classes[kErrorKinds] = {};

void raise_error(const Error& e) {
  const int raw = static_cast<int>(e.code());
  const int code = raw >= 0 && raw < kErrorKinds ? raw : static_cast<int>(ErrorCode::kInternal);
  static const char* const codes[kErrorKinds] = {
      "invalid_argument", "unsupported", "communication", "device", "internal", "out_of_memory"};
  PyObject* cls = error_classes[code];
  PyObject* exc = PyObject_CallFunction(cls, "s", e.what());
  if (exc == nullptr) return;  // the failed call set its own error
  PyObject* code_name = PyUnicode_FromString(codes[code]);
  if (code_name != nullptr) PyObject_SetAttrString(exc, "code", code_name);
  Py_XDECREF(code_name);
  PyErr_SetObject(cls, exc);
  Py_DECREF(exc);
}

// A communicator as Python holds it (and, for NCCL, the communicator it owns).
struct CommHandle {
  std::unique_ptr<Communicator> comm;
#if defined(RINGATTN_HAVE_NCCL)
  ncclComm_t nccl = nullptr;
#endif
  explicit CommHandle(std::unique_ptr<Communicator> c) : comm(std::move(c)) {}
  CommHandle(const CommHandle&) = delete;
  CommHandle& operator=(const CommHandle&) = delete;
  ~CommHandle() {
    comm.reset();
#if defined(RINGATTN_HAVE_NCCL)
    if (nccl != nullptr) (void)ncclCommDestroy(nccl);
#endif
  }
};

// What Python passes as group: nullptr (one process) or a communicator.
Communicator* comm_of(CommHandle* h) {
  return h == nullptr ? nullptr : h->comm.get();
}

// Runs `prepare` (argument conversion) so that its error on any rank of `comm` is an error on
// every rank (the library's own calls agree the same way), instead of a hang.
template <typename F>
void prepare_on_all_ranks(Communicator* comm, F&& prepare) {
  if (comm == nullptr || comm->size() == 1) {
    prepare();
  } else {
    check_on_all_ranks(*comm, prepare);
  }
}

// Python's side of ExecOptions. CUDA work is queued on the caller's stream without waiting
// (torch orders what reads the results on that stream).
ExecOptions exec_options(const std::string& backend, int threads, uintptr_t stream) {
  ExecOptions o;
  o.backend = parse_backend(backend);
  o.num_threads = threads;
  o.cuda_stream = reinterpret_cast<void*>(stream);
  o.cuda_async = true;
  return o;
}

DilatedConfig dilated_config(std::vector<int64_t> segments, std::vector<int64_t> rates,
                             const std::string& mode, bool causal, std::optional<float> scale) {
  DilatedConfig c;
  c.segment_lengths = std::move(segments);
  c.dilation_rates = std::move(rates);
  c.mode = parse_mode(mode);
  c.causal = causal;
  c.scale = scale;
  return c;
}

// Block patterns cross the torch operator boundary as one list of integers (an operator's
// arguments are tensors and scalars): per pattern kind, block size, window, global blocks,
// then rates, row_ptr and cols, each as a length and its values.
std::vector<int64_t> encode_patterns(const std::vector<BlockPattern>& patterns) {
  std::vector<int64_t> out{static_cast<int64_t>(patterns.size())};
  const auto add_list = [&](const std::vector<int64_t>& v) {
    out.push_back(static_cast<int64_t>(v.size()));
    out.insert(out.end(), v.begin(), v.end());
  };
  for (const BlockPattern& p : patterns) {
    out.insert(out.end(), {static_cast<int64_t>(p.kind), p.block_size, p.window, p.global_blocks});
    add_list(p.rates);
    add_list(p.row_ptr);
    add_list(p.cols);
  }
  return out;
}

std::vector<BlockPattern> decode_patterns(const std::vector<int64_t>& code) {
  size_t at = 0;
  const auto next = [&]() -> int64_t {
    if (at >= code.size()) fail(ErrorCode::kInvalidArgument, "a block pattern code is truncated");
    return code[at++];
  };
  const auto list = [&] {
    const int64_t n = next();
    if (n < 0 || static_cast<size_t>(n) > code.size() - at) {
      fail(ErrorCode::kInvalidArgument, "a block pattern code is truncated");
    }
    std::vector<int64_t> v(code.begin() + static_cast<ptrdiff_t>(at),
                           code.begin() + static_cast<ptrdiff_t>(at) + n);
    at += static_cast<size_t>(n);
    return v;
  };
  std::vector<BlockPattern> patterns(static_cast<size_t>(std::max<int64_t>(next(), 0)));
  for (BlockPattern& p : patterns) {
    const int64_t kind = next();
    require(kind >= 0 && kind <= static_cast<int64_t>(BlockPatternKind::kBlockList),
            "a block pattern code names kind ", kind);
    p.kind = static_cast<BlockPatternKind>(kind);
    p.block_size = next();
    p.window = next();
    p.global_blocks = next();
    p.rates = list();
    p.row_ptr = list();
    p.cols = list();
  }
  return patterns;
}

// What an attention call computes, as Python passes it (converted on every rank of the group,
// so that a bad value is an error on all of them).
struct DilatedSpec {
  std::vector<int64_t> segments, rates;
  std::string mode;
  bool causal;
  std::optional<float> scale;
};
struct SparseSpec {
  std::vector<int64_t> patterns;  // encode_patterns
  bool causal;
  std::optional<float> scale;
};
using Spec = std::variant<DilatedSpec, SparseSpec>;

// Where it runs: over a Communicator or in one process (group None), and the ExecOptions.
struct Where {
  CommHandle* group;
  std::string backend;
  int threads;
  uintptr_t stream;
};

struct ForwardViews {
  TensorView q, k, v, out;
  std::optional<TensorView> lse;
  template <typename Attention>
  void run(Attention&& a) const {
    a.forward(q, k, v, out, lse);
  }
};

struct BackwardViews {
  TensorView dout, q, k, v, out, lse, dq, dk, dv;
  template <typename Attention>
  void run(Attention&& a) const {
    a.backward(dout, q, k, v, out, lse, dq, dk, dv);
  }
};

// Converts the spec, the options and the arrays (make_views) on every rank, then runs the
// views through the spec's class: DilatedAttention in one process, else the ring; the
// block-sparse class always over a communicator (a self one for one process).
template <typename MakeViews>
void run_call(const Spec& spec, const Where& where, MakeViews&& make_views) {
  nb::gil_scoped_release nogil;
  Communicator* comm = comm_of(where.group);
  std::variant<DilatedConfig, BlockSparseConfig> config;
  ExecOptions options;
  decltype(make_views()) views;
  prepare_on_all_ranks(comm, [&] {
    if (const auto* d = std::get_if<DilatedSpec>(&spec)) {
      config = dilated_config(d->segments, d->rates, d->mode, d->causal, d->scale);
    } else {
      const auto& sp = std::get<SparseSpec>(spec);
      BlockSparseConfig c;
      c.patterns = decode_patterns(sp.patterns);
      c.causal = sp.causal;
      c.scale = sp.scale;
      config = std::move(c);
    }
    options = exec_options(where.backend, where.threads, where.stream);
    views = make_views();
  });
  if (const auto* c = std::get_if<BlockSparseConfig>(&config)) {
    const std::unique_ptr<Communicator> self = comm ? nullptr : make_self_communicator();
    views.run(BlockSparseRingDilatedAttention(*c, comm ? *comm : *self, options));
  } else if (comm == nullptr) {
    views.run(DilatedAttention(std::get<DilatedConfig>(config), options));
  } else {
    views.run(RingDilatedAttention(std::get<DilatedConfig>(config), *comm, options));
  }
}

void forward(const InArray& q, const InArray& k, const InArray& v, const OutArray& out,
             const std::optional<OutArray>& lse, const Spec& spec, const Where& where) {
  run_call(spec, where, [&] {
    ForwardViews f{view_of("q", q), view_of("k", k), view_of("v", v), view_of("out", out), {}};
    if (lse) f.lse = view_of("lse", *lse);
    return f;
  });
}

void backward(const InArray& dout, const InArray& q, const InArray& k, const InArray& v,
              const InArray& out, const InArray& lse, const OutArray& dq, const OutArray& dk,
              const OutArray& dv, const Spec& spec, const Where& where) {
  run_call(spec, where, [&] {
    return BackwardViews{view_of("dout", dout), view_of("q", q),     view_of("k", k),
                         view_of("v", v),       view_of("out", out), view_of("lse", lse),
                         view_of("dq", dq),     view_of("dk", dk),   view_of("dv", dv)};
  });
}

// The fused C++ multihead layer (inference and the benchmark): weights by their torch names.
using WeightArray = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

MultiheadWeights weights_of(const std::map<std::string, WeightArray>& named) {
  MultiheadWeights w;
  const std::pair<const char*, std::vector<float>*> slots[] = {
      {"wq", &w.wq},
      {"bq", &w.bq},
      {"wk", &w.wk},
      {"bk", &w.bk},
      {"wv", &w.wv},
      {"bv", &w.bv},
      {"wo", &w.wo},
      {"bo", &w.bo},
      {"q_norm_weight", &w.q_norm_weight},
      {"q_norm_bias", &w.q_norm_bias},
      {"k_norm_weight", &w.k_norm_weight},
      {"k_norm_bias", &w.k_norm_bias},
      {"out_norm_weight", &w.out_norm_weight},
      {"out_norm_bias", &w.out_norm_bias}};
  size_t used = 0;
  for (const auto& [name, dst] : slots) {
    const auto it = named.find(name);
    if (it == named.end()) continue;
    dst->assign(it->second.data(), it->second.data() + it->second.size());
    ++used;
  }
  if (used != named.size()) {
    for (const auto& [name, array] : named) {
      bool known = false;
      for (const auto& slot : slots) known = known || name == slot.first;
      require(known, "weights has an unknown entry '", name,
              "'; the names are those of MultiheadWeights (wq, bq, ..., out_norm_bias)");
    }
  }
  return w;
}

class FusedMultihead {
 public:
  FusedMultihead(MultiheadConfig config, const std::map<std::string, WeightArray>& weights,
                 int threads)
      : layer_(std::move(config), weights_of(weights), exec_options("cpu", threads, 0)) {}

  void forward(const InArray& query, const InArray& key, const InArray& value,
               const OutArray& y) const {
    nb::gil_scoped_release nogil;
    const TensorView vq = view_of("query", query), vk = view_of("key", key),
                     vv = view_of("value", value), vy = view_of("y", y);
    if (vq.data == vk.data && vq.data == vv.data) {
      layer_.forward(vq, vy);
    } else {
      layer_.forward(vq, vk, vv, vy);
    }
  }

 private:
  MultiheadDilatedAttention layer_;
};

std::unique_ptr<CommHandle> handle_of(std::unique_ptr<Communicator> comm) {
  return std::make_unique<CommHandle>(std::move(comm));
}

// mpi4py's handle of a communicator: the MPI_Comm's value (a pointer in Open MPI, an int in
// MPICH).
template <typename Comm>
Comm comm_from_handle(uintptr_t handle) {
  if constexpr (std::is_pointer_v<Comm>) {
    return reinterpret_cast<Comm>(handle);
  } else {
    return static_cast<Comm>(handle);
  }
}

#if defined(RINGATTN_HAVE_NCCL)
void check_nccl(ncclResult_t status, const char* call) {
  if (status != ncclSuccess) {
    fail(ErrorCode::kCommunication, call, " failed: ", ncclGetErrorString(status));
  }
}
#endif

// ringattn.Error and its kinds, and the translation of a ringattn::Error into them.
void bind_errors(nb::module_& m) {
  // Error: the base of every ringattn error; invalid arguments are also ValueErrors, the
  // rest RuntimeErrors (ErrorCode order).
  PyObject* base = PyErr_NewExceptionWithDoc(
      "ringattn.Error", "An error raised by ringattn (.code names its kind).", nullptr, nullptr);
  m.attr("Error") = nb::handle(base);
  const std::pair<const char*, PyObject*> kinds[kErrorKinds] = {
      {"InvalidArgumentError", PyExc_ValueError}, {"UnsupportedError", PyExc_RuntimeError},
      {"CommunicationError", PyExc_RuntimeError}, {"DeviceError", PyExc_RuntimeError},
      {"InternalError", PyExc_RuntimeError},      {"OutOfMemoryError", PyExc_RuntimeError}};
  for (int i = 0; i < kErrorKinds; ++i) {
    const std::string qualified = std::string("ringattn.") + kinds[i].first;
    PyObject* bases = PyTuple_Pack(2, base, kinds[i].second);
    error_classes[i] = PyErr_NewException(qualified.c_str(), bases, nullptr);
    Py_DECREF(bases);
    m.attr(kinds[i].first) = nb::handle(error_classes[i]);
  }
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      raise_error(e);
    }
  });
}

// The library's version, SIMD target and what this build has.
void bind_build_info(nb::module_& m) {
  m.def("version", &version);
  m.def("cpu_simd_target", &cpu_simd_target);
#if defined(RINGATTN_HAVE_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
#if defined(RINGATTN_HAVE_MPI)
  m.attr("has_mpi") = true;
#else
  m.attr("has_mpi") = false;
#endif
#if defined(RINGATTN_HAVE_NCCL)
  m.attr("has_nccl") = true;
#else
  m.attr("has_nccl") = false;
#endif
}

// The communicators Python can make or hand over.
void bind_communicators(nb::module_& m) {
  nb::class_<CommHandle>(m, "Communicator")
      .def_prop_ro("rank", [](const CommHandle& h) { return h.comm->rank(); })
      .def_prop_ro("size", [](const CommHandle& h) { return h.comm->size(); })
      .def_prop_ro("name", [](const CommHandle& h) { return std::string(h.comm->name()); })
      .def_prop_ro("bytes_sent", [](const CommHandle& h) { return h.comm->bytes_sent(); });
  m.def("self_communicator", [] { return handle_of(make_self_communicator()); });
  m.def(
      "python_communicator",
      [](nb::object transport) {
        return handle_of(make_python_communicator(std::move(transport)));
      },
      "transport"_a);
  m.def(
      "mpi_communicator",
      [](uintptr_t handle) {
#if defined(RINGATTN_HAVE_MPI)
        const MPI_Comm comm = comm_from_handle<MPI_Comm>(handle);
        nb::gil_scoped_release nogil;
        return handle_of(make_mpi_communicator(comm));
#else
        (void)handle;
        fail(ErrorCode::kUnsupported,
             "this build of ringattn has no MPI communicator; install an MPI (libopenmpi-dev) and "
             "rebuild, or pass a torch.distributed group");
#endif
      },
      "handle"_a);
  m.def("nccl_unique_id", []() {
#if defined(RINGATTN_HAVE_NCCL)
    ncclUniqueId id;
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    return nb::bytes(id.internal, sizeof(id.internal));
#else
        fail(ErrorCode::kUnsupported,
             "this build of ringattn has no NCCL communicator (CUDA tensors over a process group "
             "need it); rebuild where nvcc and NCCL are found");
#endif
  });
  m.def(
      "nccl_communicator",
      [](nb::bytes unique_id, int rank, int size, uintptr_t stream) {
#if defined(RINGATTN_HAVE_NCCL)
        ncclUniqueId id;
        require(unique_id.size() == sizeof(id.internal), "unique_id has ", unique_id.size(),
                " bytes; it must be nccl_unique_id()'s ", sizeof(id.internal));
        std::memcpy(id.internal, unique_id.c_str(), sizeof(id.internal));
        nb::gil_scoped_release nogil;
        ncclComm_t raw = nullptr;
        check_nccl(ncclCommInitRank(&raw, size, id, rank), "ncclCommInitRank");
        std::unique_ptr<Communicator> comm;
        try {
          comm = make_nccl_communicator(raw, reinterpret_cast<cudaStream_t>(stream));
        } catch (...) {
          (void)ncclCommDestroy(raw);
          throw;
        }
        auto h = handle_of(std::move(comm));
        h->nccl = raw;
        return h;
#else
        (void)unique_id, (void)rank, (void)size, (void)stream;
        fail(ErrorCode::kUnsupported, "this build of ringattn has no NCCL communicator");
#endif
      },
      "unique_id"_a, "rank"_a, "size"_a, "stream"_a);
}

// The attention calls (forward, backward over a spec) and the block patterns.
void bind_attention(nb::module_& m) {
  nb::class_<DilatedSpec>(m, "DilatedSpec", "What a dilated attention call computes.")
      .def(nb::init<std::vector<int64_t>, std::vector<int64_t>, std::string, bool,
                    std::optional<float>>(),
           "segment_lengths"_a, "dilation_rates"_a, "mode"_a, "causal"_a, "scale"_a.none());
  nb::class_<SparseSpec>(m, "SparseSpec", "What a block-sparse attention call computes.")
      .def(nb::init<std::vector<int64_t>, bool, std::optional<float>>(), "patterns"_a, "causal"_a,
           "scale"_a.none());
  m.def(
      "forward",
      [](const InArray& q, const InArray& k, const InArray& v, const OutArray& out,
         const std::optional<OutArray>& lse, const Spec& spec, CommHandle* group,
         std::string backend, int threads, uintptr_t stream) {
        forward(q, k, v, out, lse, spec, {group, std::move(backend), threads, stream});
      },
      "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a.none(), "spec"_a, "group"_a.none(), "backend"_a = "cpu",
      "threads"_a = 0, "stream"_a = 0,
      "Writes out (and lse) of the spec's attention; group: a Communicator or None.");
  m.def(
      "backward",
      [](const InArray& dout, const InArray& q, const InArray& k, const InArray& v,
         const InArray& out, const InArray& lse, const OutArray& dq, const OutArray& dk,
         const OutArray& dv, const Spec& spec, CommHandle* group, std::string backend, int threads,
         uintptr_t stream) {
        backward(dout, q, k, v, out, lse, dq, dk, dv, spec,
                 {group, std::move(backend), threads, stream});
      },
      "dout"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dq"_a, "dk"_a, "dv"_a, "spec"_a,
      "group"_a.none(), "backend"_a = "cpu", "threads"_a = 0, "stream"_a = 0,
      "Writes dq, dk, dv of forward.");

  nb::enum_<BlockPatternKind>(m, "BlockPatternKind")
      .value("local_window", BlockPatternKind::kLocalWindow)
      .value("dilated", BlockPatternKind::kDilated)
      .value("global_local", BlockPatternKind::kGlobalLocal)
      .value("block_list", BlockPatternKind::kBlockList);
  nb::class_<BlockPattern>(m, "BlockPattern",
                           "Which key blocks each query block attends to (the C++ factories).")
      .def_ro("kind", &BlockPattern::kind)
      .def_ro("block_size", &BlockPattern::block_size)
      .def_ro("window", &BlockPattern::window)
      .def_ro("rates", &BlockPattern::rates)
      .def_ro("global_blocks", &BlockPattern::global_blocks)
      .def_ro("row_ptr", &BlockPattern::row_ptr)
      .def_ro("cols", &BlockPattern::cols)
      .def_static("local_window", &BlockPattern::local_window, "block_size"_a, "window"_a)
      .def_static("dilated", &BlockPattern::dilated, "block_size"_a, "rates"_a)
      .def_static("global_local", &BlockPattern::global_local, "block_size"_a, "global_blocks"_a,
                  "window"_a)
      .def_static("block_list", &BlockPattern::block_list, "block_size"_a, "row_ptr"_a, "cols"_a)
      .def(
          "key_blocks",
          [](const BlockPattern& p, int64_t seq) {
            const BlockLayout l = p.layout(seq);
            std::vector<std::vector<int64_t>> rows(static_cast<size_t>(l.blocks));
            for (int64_t qb = 0; qb < l.blocks; ++qb) {
              rows[static_cast<size_t>(qb)].assign(l.cols.begin() + l.row_ptr[qb],
                                                   l.cols.begin() + l.row_ptr[qb + 1]);
            }
            return rows;
          },
          "seq"_a, "The key blocks of every query block over a sequence of seq rows.");
  m.def("encode_patterns", &encode_patterns, "patterns"_a);
  m.def(
      "block_sparse_density",
      [](const std::vector<int64_t>& patterns, bool causal, int64_t seq, int64_t heads) {
        BlockSparseConfig c;
        c.patterns = decode_patterns(patterns);
        c.causal = causal;
        return block_sparse_density(c, seq, heads);
      },
      "patterns"_a, "causal"_a, "seq"_a, "heads"_a);
}

// The fused C++ multihead layer.
void bind_multihead(nb::module_& m) {
  nb::class_<FusedMultihead>(m, "FusedMultihead",
                             "The C++ MultiheadDilatedAttention (fp32 CPU tensors, forward).")
      .def(
          "__init__",
          [](FusedMultihead* self, int64_t embed_dim, int64_t num_heads, int64_t kv_heads,
             std::vector<int64_t> segments, std::vector<int64_t> rates, const std::string& mode,
             bool causal, std::optional<float> scale, bool bias, bool layer_norm, float eps,
             const std::map<std::string, WeightArray>& weights, int threads) {
            MultiheadConfig c;
            c.embed_dim = embed_dim;
            c.num_heads = num_heads;
            c.kv_heads = kv_heads;
            c.attention =
                dilated_config(std::move(segments), std::move(rates), mode, causal, scale);
            c.bias = bias;
            c.layer_norm = layer_norm;
            c.layer_norm_eps = eps;
            new (self) FusedMultihead(std::move(c), weights, threads);
          },
          "embed_dim"_a, "num_heads"_a, "kv_heads"_a, "segment_lengths"_a, "dilation_rates"_a,
          "mode"_a, "causal"_a, "scale"_a.none(), "bias"_a, "layer_norm"_a, "layer_norm_eps"_a,
          "weights"_a, "threads"_a = 0)
      .def("forward", &FusedMultihead::forward, "query"_a, "key"_a, "value"_a, "y"_a);
}

}  // namespace

}  // namespace ringattn::python

NB_MODULE(_C, m) {
  using namespace ringattn;
  using namespace ringattn::python;
  m.doc() = "ringattn's C++ library over DLPack arrays (use the ringattn package, not this)";
  bind_errors(m);
  bind_build_info(m);
  bind_communicators(m);
  bind_attention(m);
  bind_multihead(m);
}
