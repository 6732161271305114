// pybind11 module lora_da._core: the compiled core's entry points.
// Tensors cross as raw addresses (tensor.data_ptr()) plus shapes and dtypes, so
// the module links neither libtorch nor the CUDA libraries.
//
// A solve is described by a request object whose fields are all named:
//   request = _core.GuidanceRequest(batch=..., n=..., delta=..., ...)   (keywords only)
//   report = _core.lobpcg_guidance(request)
// (likewise DenseRequest / lobpcg_dense). An unknown, missing or mistyped field
// is a TypeError naming it; a bad value is a ValueError naming it (checked when
// the request is made and again when it is solved, as fields stay writable).
// The request is then copied into the plain C struct of solve_request.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "solve_request.h"

#ifndef LORA_DA_VERSION
#define LORA_DA_VERSION "0.0.0"
#endif

namespace py = pybind11;

void register_build_info(py::module_& m);  // csrc/build_info.cpp
void register_cholesky(py::module_& m);    // csrc/cholesky_cpu.cpp
void register_gram(py::module_& m);        // csrc/gram_cpu.cpp

namespace {

// The largest size the LP64 BLAS/LAPACK, cuBLAS and cuSOLVER interfaces take.
constexpr std::int64_t kMaxBlasSize = std::numeric_limits<int>::max();

// ---- Fields of a request, read-write by name from Python ----

// Fields every solve has.
struct SolveFields {
  std::int64_t batch = 0;  // problems
  std::int64_t n = 0;      // size of each problem
  std::string dtype;       // "float32" or "float64" (of every tensor handed over)
  std::int64_t k = 0;      // wanted eigenpairs
  std::optional<std::int64_t> guard;  // guard vectors beyond k; None = max(k, 8)
  bool largest = false;
  std::optional<double> tol;  // relative residual tolerance; None = the precision's default
  std::int64_t max_iter = 0;
  std::uint64_t seed = 0;
  std::uintptr_t eigenvectors = 0;  // output: batch x k x n row-major (= n x k column-major per problem)
  std::string device;               // "cpu" or "cuda"
  std::uintptr_t stream = 0;        // CUDA stream handle (0 = legacy default stream; 0 on the CPU)
  // the LOBPCG variant with one host exchange per iteration; None = the backend's choice
  // (CUDA: yes, CPU: no). The CPU runs it too, for testing what CUDA runs.
  std::optional<bool> one_exchange;
};

struct DenseRequest : SolveFields {
  std::uintptr_t matrices = 0;    // batch x n x n (symmetric; either order)
  std::int64_t matrix_stride = 0;  // elements between consecutive matrices
};

struct GuidanceRequest : SolveFields {
  std::uintptr_t delta = 0;         // Δ̂: row-major batch x n x d_out (= Dᵀ column-major), or
  bool delta_column_major = false;  //    with delta_column_major, column-major n x d_out matrices
  std::int64_t d_out = 0;
  std::int64_t delta_stride = 0;
  std::uintptr_t cholesky = 0;  // lower Cholesky factor L of Z, row-major n x n (= Lᵀ column-major)
  std::int64_t cholesky_stride = 0;  // 0 = one factor shared by the batch
  double alpha = 0;
  std::vector<double> variance_scale;  // βc, one per problem
  // optional preconditioner (I − s M⁻¹)/α from the lower Cholesky factor of M = sI + αZ
  // (same layout as `cholesky`) and one shift s per problem
  std::optional<std::uintptr_t> preconditioner_cholesky;
  std::int64_t preconditioner_stride = 0;
  std::vector<double> preconditioner_shift;
  // optional start block: initial_cols columns, n x initial_cols column-major per problem
  std::optional<std::uintptr_t> initial;
  std::int64_t initial_cols = 0;
  std::int64_t initial_stride = 0;
  // "dense": form Ω (and P) once per batch, then one batched GEMM per application;
  // "operator": the factored form (GEMMs and triangular solves); "auto": dense on CUDA
  // when it fits in the free device memory, the operator form on the CPU.
  std::string omega_form = "auto";
  std::optional<std::int64_t> dense_chunk;  // dense Ω: at most this many problems at once (None = as many as fit)
};

const char* type_name(py::handle value) { return Py_TYPE(value.ptr())->tp_name; }

[[noreturn]] void wrong_type(const std::string& where, const char* expected, py::handle value) {
  throw py::type_error(where + " must be " + expected + ", got " + type_name(value));
}

// Strict conversions: a bool is not an int, a float is not an int, a str is not a number.
py::object as_index(py::handle value, const std::string& where) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) wrong_type(where, "an int", value);
  PyObject* index = PyNumber_Index(value.ptr());
  if (index == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(index);
}

void convert(py::handle value, const std::string& where, std::int64_t& out) {
  py::object index = as_index(value, where);
  int overflow = 0;
  const long long result = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) throw py::value_error(where + "=" + std::string(py::str(index)) + " does not fit in 64 bits");
  if (result == -1 && PyErr_Occurred()) throw py::error_already_set();
  out = result;
}

void convert(py::handle value, const std::string& where, std::uint64_t& out) {  // also addresses (uintptr_t)
  py::object index = as_index(value, where);
  if (PyObject_RichCompareBool(index.ptr(), py::int_(0).ptr(), Py_LT) == 1)
    throw py::value_error(where + "=" + std::string(py::str(index)) + " must be >= 0");
  const unsigned long long result = PyLong_AsUnsignedLongLong(index.ptr());
  if (result == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(where + "=" + std::string(py::str(index)) + " does not fit in 64 bits");
  }
  out = result;
}

void convert(py::handle value, const std::string& where, double& out) {
  if (PyBool_Check(value.ptr()) || !(PyFloat_Check(value.ptr()) || PyLong_Check(value.ptr())))
    wrong_type(where, "a float", value);
  const double result = PyFloat_AsDouble(value.ptr());
  if (result == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(where + " does not fit in a double");
  }
  out = result;
}

void convert(py::handle value, const std::string& where, bool& out) {
  if (!PyBool_Check(value.ptr())) wrong_type(where, "a bool", value);
  out = value.ptr() == Py_True;
}

void convert(py::handle value, const std::string& where, std::string& out) {
  if (!PyUnicode_Check(value.ptr())) wrong_type(where, "a str", value);
  out = value.cast<std::string>();
}

void convert(py::handle value, const std::string& where, std::vector<double>& out) {
  if (!PyList_Check(value.ptr()) && !PyTuple_Check(value.ptr())) wrong_type(where, "a list of floats", value);
  py::sequence items = py::reinterpret_borrow<py::sequence>(value);
  std::vector<double> result(items.size());
  for (std::size_t i = 0; i < result.size(); ++i) {
    py::object item = items[i];
    convert(item, where + "[" + std::to_string(i) + "]", result[i]);
  }
  out = std::move(result);
}

template <typename V>
void convert(py::handle value, const std::string& where, std::optional<V>& out) {
  if (value.is_none()) {
    out.reset();
    return;
  }
  V result{};
  convert(value, where, result);
  out = result;
}

// One named field of request type R.
template <typename R>
struct Field {
  std::string name;
  bool required;
  std::function<void(R&, py::handle, const std::string&)> set;
  std::function<py::object(const R&)> get;
};

template <typename R>
class Fields {
 public:
  explicit Fields(std::string type) : type_(std::move(type)) {}
  template <typename V>
  Fields& add(const char* name, V R::*member, bool required = true) {
    fields_.push_back({name, required,
                       [member](R& request, py::handle value, const std::string& where) {
                         convert(value, where, request.*member);
                       },
                       [member](const R& request) { return py::cast(request.*member); }});
    return *this;
  }
  const std::string& type() const { return type_; }
  const std::vector<Field<R>>& all() const { return fields_; }
  const Field<R>* find(const std::string& name) const {
    for (const auto& field : fields_)
      if (field.name == name) return &field;
    return nullptr;
  }

 private:
  std::string type_;
  std::vector<Field<R>> fields_;
};

// The fields of SolveFields, in the order they are listed.
template <typename R>
void add_solve_fields(Fields<R>& fields) {
  fields.template add<std::int64_t>("batch", &R::batch)
      .template add<std::int64_t>("n", &R::n)
      .template add<std::string>("dtype", &R::dtype)
      .template add<std::int64_t>("k", &R::k)
      .template add<std::optional<std::int64_t>>("guard", &R::guard)
      .template add<bool>("largest", &R::largest)
      .template add<std::optional<double>>("tol", &R::tol)
      .template add<std::int64_t>("max_iter", &R::max_iter)
      .template add<std::uint64_t>("seed", &R::seed)
      .template add<std::uintptr_t>("eigenvectors", &R::eigenvectors)
      .template add<std::string>("device", &R::device)
      .template add<std::uintptr_t>("stream", &R::stream)
      .template add<std::optional<bool>>("one_exchange", &R::one_exchange, false);
}

const Fields<DenseRequest>& dense_fields() {
  static const Fields<DenseRequest> fields = [] {
    Fields<DenseRequest> f("DenseRequest");
    f.add("matrices", &DenseRequest::matrices).add("matrix_stride", &DenseRequest::matrix_stride);
    add_solve_fields(f);
    return f;
  }();
  return fields;
}

const Fields<GuidanceRequest>& guidance_fields() {
  static const Fields<GuidanceRequest> fields = [] {
    using G = GuidanceRequest;
    Fields<G> f("GuidanceRequest");
    f.add("delta", &G::delta)
        .add("delta_column_major", &G::delta_column_major)
        .add("d_out", &G::d_out)
        .add("delta_stride", &G::delta_stride)
        .add("cholesky", &G::cholesky)
        .add("cholesky_stride", &G::cholesky_stride)
        .add("alpha", &G::alpha)
        .add("variance_scale", &G::variance_scale)
        .add("preconditioner_cholesky", &G::preconditioner_cholesky, false)
        .add("preconditioner_stride", &G::preconditioner_stride, false)
        .add("preconditioner_shift", &G::preconditioner_shift, false)
        .add("initial", &G::initial, false)
        .add("initial_cols", &G::initial_cols, false)
        .add("initial_stride", &G::initial_stride, false)
        .add("omega_form", &G::omega_form, false)
        .add("dense_chunk", &G::dense_chunk, false);
    add_solve_fields(f);
    return f;
  }();
  return fields;
}

// ---- Validation (one-line ValueErrors naming the field) ----

class Checker {
 public:
  explicit Checker(const std::string& type) : type_(type) {}
  [[noreturn]] void fail(const std::string& message) const { throw py::value_error(type_ + "." + message); }
  void range(const char* name, std::int64_t value, std::int64_t low, std::int64_t high, const char* why = "") const {
    if (value < low || value > high)
      fail(std::string(name) + "=" + std::to_string(value) + " must lie in [" + std::to_string(low) + ", " +
           std::to_string(high) + "]" + why);
  }
  void size(const char* name, std::int64_t value, std::int64_t low = 1) const {
    range(name, value, low, kMaxBlasSize, " (the 32-bit size range of BLAS)");
  }
  void stride(const char* name, std::int64_t value) const {
    if (value < 0) fail(std::string(name) + "=" + std::to_string(value) + " must be >= 0");
  }
  void address(const char* name, std::uintptr_t value) const {
    if (value == 0) fail(std::string(name) + " is a null address");
  }
  void finite(const char* name, double value) const {
    if (!std::isfinite(value)) fail(std::string(name) + "=" + std::to_string(value) + " must be finite");
  }
  void per_problem(const char* name, const std::vector<double>& values, std::int64_t batch) const {
    if (std::int64_t(values.size()) != batch)
      fail(std::string(name) + " needs one value per problem (batch=" + std::to_string(batch) + "), got " +
           std::to_string(values.size()));
    for (std::size_t i = 0; i < values.size(); ++i)
      if (!std::isfinite(values[i]))
        fail(std::string(name) + "[" + std::to_string(i) + "]=" + std::to_string(values[i]) + " must be finite");
  }

 private:
  const std::string& type_;
};

void validate_solve_fields(const SolveFields& r, const Checker& check) {
  check.size("batch", r.batch);
  check.size("n", r.n);
  if (r.dtype != "float32" && r.dtype != "float64")
    check.fail("dtype='" + r.dtype + "' must be 'float32' or 'float64'");
  check.range("k", r.k, 1, r.n, " = [1, n]");
  if (r.guard) check.size("guard", *r.guard, 0);
  if (r.tol && !(std::isfinite(*r.tol) && *r.tol > 0))
    check.fail("tol=" + std::to_string(*r.tol) + " must be finite and > 0 (None = the default)");
  check.size("max_iter", r.max_iter, 0);
  check.address("eigenvectors", r.eigenvectors);
  if (r.device != "cpu" && r.device != "cuda") check.fail("device='" + r.device + "' must be 'cpu' or 'cuda'");
  if (r.device == "cpu" && r.stream != 0) check.fail("stream must be 0 on the CPU");
}

void validate(const DenseRequest& r) {
  Checker check(dense_fields().type());
  validate_solve_fields(r, check);
  check.address("matrices", r.matrices);
  check.stride("matrix_stride", r.matrix_stride);
}

void validate(const GuidanceRequest& r) {
  Checker check(guidance_fields().type());
  validate_solve_fields(r, check);
  check.address("delta", r.delta);
  check.size("d_out", r.d_out);
  check.stride("delta_stride", r.delta_stride);
  check.address("cholesky", r.cholesky);
  check.stride("cholesky_stride", r.cholesky_stride);
  check.finite("alpha", r.alpha);
  check.per_problem("variance_scale", r.variance_scale, r.batch);
  if (r.preconditioner_cholesky) {
    check.address("preconditioner_cholesky", *r.preconditioner_cholesky);
    check.stride("preconditioner_stride", r.preconditioner_stride);
    check.per_problem("preconditioner_shift", r.preconditioner_shift, r.batch);
    if (!(r.alpha > 0)) check.fail("alpha=" + std::to_string(r.alpha) + " must be > 0 with a preconditioner");
  } else if (!r.preconditioner_shift.empty()) {
    check.fail("preconditioner_shift is given without preconditioner_cholesky");
  }
  if (r.omega_form != "auto" && r.omega_form != "operator" && r.omega_form != "dense")
    check.fail("omega_form='" + r.omega_form + "' must be 'auto', 'operator' or 'dense'");
  if (r.dense_chunk) check.size("dense_chunk", *r.dense_chunk);
  if (r.initial) {
    check.address("initial", *r.initial);
    check.size("initial_cols", r.initial_cols, 0);
    check.stride("initial_stride", r.initial_stride);
  } else if (r.initial_cols != 0) {
    check.fail("initial_cols=" + std::to_string(r.initial_cols) + " is given without initial");
  }
}

// ---- The Python class of a request ----

template <typename R>
std::string request_repr(const R& request, const Fields<R>& fields) {
  std::string text = fields.type() + "(";
  for (std::size_t i = 0; i < fields.all().size(); ++i) {
    const auto& field = fields.all()[i];
    text += (i ? ", " : "") + field.name + "=" + std::string(py::repr(field.get(request)));
  }
  return text + ")";
}

template <typename R>
void bind_request(py::module_& m, const Fields<R>& fields, const char* doc) {
  py::class_<R> cls(m, fields.type().c_str(), doc);
  cls.def(py::init([&fields](py::args args, py::kwargs kwargs) {
    if (args.size() != 0) throw py::type_error(fields.type() + " takes keyword arguments only");
    R request;
    std::vector<std::string> given;
    for (auto item : kwargs) {
      const std::string name = py::str(item.first);
      const Field<R>* field = fields.find(name);
      if (field == nullptr) throw py::type_error(fields.type() + ": unknown field '" + name + "'");
      field->set(request, item.second, fields.type() + "." + name);
      given.push_back(name);
    }
    std::string missing;
    for (const auto& field : fields.all()) {
      if (!field.required) continue;
      bool present = false;
      for (const auto& name : given) present = present || name == field.name;
      if (!present) missing += (missing.empty() ? "'" : ", '") + field.name + "'";
    }
    if (!missing.empty()) throw py::type_error(fields.type() + ": missing field(s) " + missing);
    validate(request);
    return request;
  }));
  py::list names, required;
  for (const auto& field : fields.all()) {
    const std::string where = fields.type() + "." + field.name;
    auto set = field.set;
    auto get = field.get;
    cls.def_property(
        field.name.c_str(), [get](const R& request) { return get(request); },
        [set, where](R& request, py::handle value) { set(request, value, where); });
    names.append(field.name);
    if (field.required) required.append(field.name);
  }
  cls.attr("fields") = py::tuple(names);
  cls.attr("required_fields") = py::tuple(required);
  cls.def("__repr__", [&fields](const R& request) { return request_repr(request, fields); });
}

// ---- Solving ----

void copy_solve_fields(const SolveFields& r, lora_da_solve_request& request) {
  request.dtype = r.dtype == "float64" ? LORA_DA_FLOAT64 : LORA_DA_FLOAT32;
  request.batch = r.batch;
  request.n = r.n;
  request.k = r.k;
  request.guard = r.guard ? *r.guard : -1;
  request.largest = r.largest ? 1 : 0;
  request.tol = r.tol ? *r.tol : -1.0;
  request.max_iter = int(r.max_iter);
  request.seed = r.seed;
  request.stream = r.stream;
  request.one_exchange = r.one_exchange ? (*r.one_exchange ? 1 : 0) : -1;
  request.eigenvectors = reinterpret_cast<void*>(r.eigenvectors);
}

// Runs the request on `device` ("cpu" or "cuda") and packs the report.
py::dict run_request(lora_da_solve_request& request, const std::string& device) {
  const std::size_t pairs = std::size_t(request.batch) * std::size_t(request.k);
  std::vector<double> eigenvalues(pairs), residual_norms(pairs), norm_estimate(request.batch);
  std::vector<int> iterations(request.batch);
  std::vector<unsigned char> converged(request.batch);
  request.eigenvalues = eigenvalues.data();
  request.residual_norms = residual_norms.data();
  request.iterations = iterations.data();
  request.converged = converged.data();
  request.norm_estimate = norm_estimate.data();
  char message[1024] = {0};
  int status;
  std::string backend;
  {
    py::gil_scoped_release release;
    if (device == "cpu") {
      status = lora_da_cpu_solve(&request, message, sizeof(message));
      backend = "lobpcg/cpu-openblas";
    } else {  // validated: "cuda"
      status = lora_da_cuda_solve(&request, message, sizeof(message));
      backend = "lobpcg/cuda-cublas-cusolver";
    }
  }
  if (status != 0) throw std::runtime_error(std::string("lora_da LOBPCG failed: ") + message);
  py::dict out;
  out["eigenvalues"] = eigenvalues;
  out["residual_norms"] = residual_norms;
  out["iterations"] = iterations;
  out["converged"] = std::vector<bool>(converged.begin(), converged.end());
  out["norm_estimate"] = norm_estimate;
  out["dense_fallback"] = request.dense_fallback != 0;
  out["block_size"] = request.block_size;
  out["tol"] = request.tol_used;
  out["one_exchange"] = request.one_exchange_used != 0;
  out["downloads"] = request.downloads;
  out["uploads"] = request.uploads;
  if (request.operator_kind == LORA_DA_OPERATOR_GUIDANCE) {
    out["omega_form"] = std::string(request.omega_dense ? "dense" : "operator");
    out["problems_per_chunk"] = request.problems_per_chunk;
  }
  // what ran beyond the CPU default: "(dense fallback)", or "(dense Ω, one exchange)" (CUDA's default)
  std::string variant;
  if (request.dense_fallback) {
    variant = "dense fallback";
  } else {
    if (request.operator_kind == LORA_DA_OPERATOR_GUIDANCE && request.omega_dense) variant = "dense Ω";
    if (request.one_exchange_used) variant += std::string(variant.empty() ? "" : ", ") + "one exchange";
  }
  out["backend"] = variant.empty() ? backend : backend + " (" + variant + ")";
  return out;
}

// By value: the solve runs without the GIL on a copy no other thread can change.
py::dict solve_dense(DenseRequest r) {
  validate(r);
  lora_da_solve_request request{};
  request.operator_kind = LORA_DA_OPERATOR_DENSE;
  copy_solve_fields(r, request);
  request.matrices = reinterpret_cast<const void*>(r.matrices);
  request.matrix_stride = r.matrix_stride;
  return run_request(request, r.device);
}

py::dict solve_guidance(GuidanceRequest r) {
  validate(r);
  lora_da_solve_request request{};
  request.operator_kind = LORA_DA_OPERATOR_GUIDANCE;
  copy_solve_fields(r, request);
  request.d_transposed = reinterpret_cast<const void*>(r.delta);
  request.d_column_major = r.delta_column_major ? 1 : 0;
  request.d_out = r.d_out;
  request.stride_d = r.delta_stride;
  request.z_upper = reinterpret_cast<const void*>(r.cholesky);
  request.stride_z = r.cholesky_stride;
  request.alpha = r.alpha;
  request.omega_form = r.omega_form == "dense"      ? LORA_DA_OMEGA_DENSE
                       : r.omega_form == "operator" ? LORA_DA_OMEGA_OPERATOR
                                                    : LORA_DA_OMEGA_AUTO;
  request.dense_chunk = r.dense_chunk ? *r.dense_chunk : 0;
  request.variance_scale = r.variance_scale.data();
  if (r.preconditioner_cholesky) {
    request.preconditioner = reinterpret_cast<const void*>(*r.preconditioner_cholesky);
    request.stride_p = r.preconditioner_stride;
    request.preconditioner_shift = r.preconditioner_shift.data();
  }
  if (r.initial) {
    request.initial = reinterpret_cast<const void*>(*r.initial);
    request.initial_cols = r.initial_cols;
    request.initial_stride = r.initial_stride;
  }
  return run_request(request, r.device);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lora-da compiled core";
  register_build_info(m);  // csrc/build_info.cpp
  register_cholesky(m);    // csrc/cholesky_cpu.cpp
  register_gram(m);        // csrc/gram_cpu.cpp

  bind_request(m, dense_fields(),
               "A batched LOBPCG solve on dense symmetric matrices, every field by name (keywords only). "
               "matrices: address of batch matrices n x n, matrix_stride elements apart (only symmetric "
               "matrices; either order). eigenvectors: address of the output, batch x k x n row-major "
               "(= n x k column-major per problem). guard / tol: None = the solver's default. "
               "See `fields` and `required_fields`.");
  bind_request(m, guidance_fields(),
               "A batched LOBPCG solve on Ω v = −α D(Dᵀv) + c Z⁻¹v, every field by name (keywords only). "
               "delta: address of D, a row-major batch x n x d_out tensor (= Dᵀ column-major), or with "
               "delta_column_major a batch of column-major n x d_out matrices; cholesky: the lower Cholesky "
               "factor L of Z as a row-major n x n tensor (= Lᵀ column-major; cholesky_stride 0 = shared); "
               "variance_scale: c (β folded in) per problem. Optional: preconditioner_cholesky (the lower "
               "factor of M = sI + αZ, same layout as cholesky; P = (I − s M⁻¹)/α) with "
               "preconditioner_stride and one preconditioner_shift s per problem; initial (n x initial_cols "
               "column-major per problem, initial_stride apart) for the first start columns; omega_form "
               "('auto', 'operator' or 'dense') and dense_chunk (dense Ω: at most this many problems at once). "
               "Other fields as in DenseRequest. See `fields` and `required_fields`.");

  m.def("lobpcg_dense", &solve_dense, py::arg("request"),
        "Solves a DenseRequest; returns the report (eigenvalues, residual_norms, iterations, converged, "
        "norm_estimate, dense_fallback, block_size, tol, backend, one_exchange, and the host <-> backend "
        "transfers downloads / uploads; a GuidanceRequest's adds omega_form and problems_per_chunk). Eigenvectors go to request.eigenvectors.");
  m.def("lobpcg_guidance", &solve_guidance, py::arg("request"),
        "Solves a GuidanceRequest; returns the report as lobpcg_dense does.");
}
