// The eager fast path of one cached Triton launch, in C++ (see cpp_launch.py for why).
//
// A Launch object is made for one set of input layouts and one compiled Triton kernel: the
// single-tensor rotation (inputs: x; outputs: out) and the fused Q/K rotation (inputs: q, k,
// cos, sin, matrix -- the last three may be None --; outputs: qo, ko). Calling it with
// (*inputs, scale) checks what its cache cannot know (plain dense CUDA tensors by their
// dispatch keys, no dispatch mode, nothing autograd would record, no forward-mode AD level
// open; each input's layout, the current device, triton's launch hooks, 16-byte alignment, a
// current CUDA context), allocates the outputs with their recorded layouts from the CUDA
// allocator and launches the kernel with cuLaunchKernel (cuLaunchKernelEx with the programmatic
// stream serialization attribute for a kernel compiled for PDL). It returns None, having launched
// nothing, when a check fails: the caller then takes triton's own launch path, which handles
// every case.
//
// The kernel's parameters are the non-constexpr arguments of its Triton signature, in order,
// each passed by address with its C type (pointers as 64-bit device addresses, fp32 as the
// float's bits), then triton's scratch pointers (null: the kernels cached here use no
// scratch memory). cpp_launch.py builds the slot list from the kernel's own signature and
// checks the result against triton's launcher once per compiled kernel.
//
// No CUDA headers: the few driver entry points are declared here and looked up in
// libcuda.so.1 when the module is loaded (load_driver); the current stream comes from
// torch's device-guard interface.

#include <Python.h>

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/utils/object_ptr.h>

namespace {

typedef int CUresult;
typedef void* CUfunction;
typedef void* CUstream;
typedef void* CUcontext;
typedef CUresult (*LaunchKernelFn)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                   unsigned, unsigned, CUstream, void**, void**);
typedef CUresult (*CtxGetCurrentFn)(CUcontext*);
typedef CUresult (*GetErrorNameFn)(CUresult, const char**);

// cuLaunchKernelEx's argument types, as the driver API defines them (CUDA 12.0+): needed for
// one attribute, programmatic stream serialization (PDL: the kernel may start while the
// previous kernel in the stream finishes; it waits for it with griddepcontrol.wait before
// touching memory).
constexpr int kAttrProgrammaticStreamSerialization = 6;  // CU_LAUNCH_ATTRIBUTE_..._SERIALIZATION
struct alignas(8) LaunchAttribute {  // CUlaunchAttribute (its value union holds pointers)
  int id;
  char pad[4];
  union {
    char bytes[64];
    int value;  // programmaticStreamSerializationAllowed
    void* align;
  } value;
};
struct LaunchConfig {  // CUlaunchConfig
  unsigned grid_x, grid_y, grid_z;
  unsigned block_x, block_y, block_z;
  unsigned shared;
  CUstream stream;
  LaunchAttribute* attrs;
  unsigned num_attrs;
};
static_assert(sizeof(LaunchAttribute) == 72 && alignof(LaunchAttribute) == 8,
              "CUlaunchAttribute: 72 bytes, 8-byte aligned");
static_assert(offsetof(LaunchAttribute, value) == 8, "CUlaunchAttribute::value at 8");
static_assert(sizeof(LaunchConfig) == 56 && offsetof(LaunchConfig, stream) == 32 &&
                  offsetof(LaunchConfig, attrs) == 40 && offsetof(LaunchConfig, num_attrs) == 48,
              "CUlaunchConfig layout");
typedef CUresult (*LaunchKernelExFn)(const LaunchConfig*, CUfunction, void**, void**);

LaunchKernelFn cu_launch_kernel = nullptr;
LaunchKernelExFn cu_launch_kernel_ex = nullptr;  // nullptr where the driver lacks it (< 12.0)
CtxGetCurrentFn cu_ctx_get_current = nullptr;
GetErrorNameFn cu_get_error_name = nullptr;

bool load_driver() {
  if (cu_launch_kernel != nullptr) {
    return true;
  }
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
  if (lib == nullptr) {
    lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  }
  if (lib == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "cpp launch: libcuda.so.1 could not be loaded");
    return false;
  }
  auto launch = reinterpret_cast<LaunchKernelFn>(dlsym(lib, "cuLaunchKernel"));
  auto ctx = reinterpret_cast<CtxGetCurrentFn>(dlsym(lib, "cuCtxGetCurrent"));
  auto name = reinterpret_cast<GetErrorNameFn>(dlsym(lib, "cuGetErrorName"));
  if (launch == nullptr || ctx == nullptr || name == nullptr) {
    PyErr_SetString(PyExc_RuntimeError,
                    "cpp launch: libcuda.so.1 lacks cuLaunchKernel, cuCtxGetCurrent or cuGetErrorName");
    return false;
  }
  cu_ctx_get_current = ctx;
  cu_get_error_name = name;
  cu_launch_kernel_ex = reinterpret_cast<LaunchKernelExFn>(dlsym(lib, "cuLaunchKernelEx"));
  cu_launch_kernel = launch;
  return true;
}

// Roles of a parameter slot (cpp_launch.py uses the same numbers). A pointer slot's value is
// the index of its input (IN_PTR) or output (OUT_PTR).
enum Role { VALUE = 0, IN_PTR = 1, OUT_PTR = 2, SCALE = 3 };

// Most inputs and outputs of one Launch (the fused Q/K launch has 5 and 2): fixed arrays keep
// the per-call path free of heap allocations.
constexpr size_t kMaxInputs = 8;
constexpr size_t kMaxOutputs = 4;

// One input's expected layout (or an input that must be None), or one output's layout.
struct Operand {
  bool present = false;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
};

struct State {
  CUfunction function = nullptr;
  unsigned grid = 0;
  unsigned block = 0;
  unsigned shared = 0;
  int device = 0;
  std::vector<Operand> inputs;
  std::vector<Operand> outputs;
  std::vector<uint64_t> storage;  // one 8-byte slot per parameter
  std::vector<void*> params;      // &storage[i], then the scratch pointers
  std::vector<std::pair<size_t, size_t>> in_slots;   // (slot, input index)
  std::vector<std::pair<size_t, size_t>> out_slots;  // (slot, output index)
  std::vector<size_t> scale_slots;
  double last_scale = 0.0;
  bool has_scale = false;
  PyObject* runtime = nullptr;  // triton's knobs.runtime (owned), or nullptr
  PyObject* owner = nullptr;    // the triton CompiledKernel (owned): keeps `function` loaded
  bool pdl = false;  // launch with programmatic stream serialization (cuLaunchKernelEx)
  LaunchAttribute pdl_attr{};
};

// Thread safety: a call writes its pointers and scale into the Launch's parameter slots and
// launches without releasing the GIL, so two threads never interleave on one Launch. (A
// free-threaded Python re-enables the GIL for this module: it does not declare otherwise.)

struct LaunchObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  State* state;
};

PyObject* s_enter = nullptr;
PyObject* s_exit = nullptr;
PyObject* s_calls = nullptr;

// Mirrors launch.py's hooks_active(): a hook is set when it is not None and, if it has a
// ``calls`` list (triton's hook chains), that list is not empty. Returns -1 on error.
int hook_set(PyObject* runtime, PyObject* name) {
  PyObject* hook = PyObject_GetAttr(runtime, name);
  if (hook == nullptr) {
    PyErr_Clear();
    return 0;
  }
  int set = 0;
  if (hook != Py_None) {
    PyObject* calls = PyObject_GetAttr(hook, s_calls);
    if (calls == nullptr) {
      PyErr_Clear();
      set = 1;
    } else {
      set = PyObject_IsTrue(calls);
      Py_DECREF(calls);
    }
  }
  Py_DECREF(hook);
  return set;
}

int hooks_active(const State* st) {
  if (st->runtime == nullptr) {
    return 0;
  }
  int enter = hook_set(st->runtime, s_enter);
  if (enter != 0) {
    return enter;
  }
  return hook_set(st->runtime, s_exit);
}

void write_scale(State* st, double scale) {
  float f = static_cast<float>(scale);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  for (size_t i : st->scale_slots) {
    st->storage[i] = bits;
  }
  st->last_scale = scale;
  st->has_scale = true;
}

void write_pointers(State* st, const uint64_t* in_ptrs, const uint64_t* out_ptrs) {
  for (const auto& slot : st->in_slots) {
    st->storage[slot.first] = in_ptrs[slot.second];
  }
  for (const auto& slot : st->out_slots) {
    st->storage[slot.first] = out_ptrs[slot.second];
  }
}

bool layout_matches(const Operand& want, const at::Tensor& x) {
  if (x.scalar_type() != want.dtype) {
    return false;
  }
  auto sizes = x.sizes();
  auto strides = x.strides();
  if (sizes.size() != want.sizes.size()) {
    return false;
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] != want.sizes[i] || strides[i] != want.strides[i]) {
      return false;
    }
  }
  return true;
}

// The call's inputs: each a tensor or None (nullptr here), as a vectorcall passes them.
// `plain`: every tensor is a torch.Tensor itself (or a Parameter), not a subclass, whose
// dispatch a direct launch would skip.
struct Inputs {
  size_t n = 0;
  bool plain = true;
  const at::Tensor* tensors[kMaxInputs];
};

PyObject* launch_cuda(State* st, const Inputs& in, double scale);
PyObject* launch_checked(State* st, const Inputs& in, double scale);

// The first `n` (<= kMaxInputs) arguments as inputs: each a tensor or None; false with a
// Python error set when one is neither -- unless `lenient`: then such an input (an FX proxy
// being traced, say) only makes the call not plain, so that a Table declines it and the
// caller's own path handles it.
bool read_inputs(PyObject* const* args, size_t n, const char* what, Inputs* in,
                 bool lenient = false) {
  in->n = n;
  in->plain = true;
  for (size_t i = 0; i < n; ++i) {
    if (args[i] == Py_None) {
      in->tensors[i] = nullptr;
    } else if (THPVariable_CheckExact(args[i])) {
      in->tensors[i] = &THPVariable_Unpack(args[i]);
    } else if (THPVariable_Check(args[i])) {
      in->plain = false;
      in->tensors[i] = &THPVariable_Unpack(args[i]);
    } else if (lenient) {
      in->plain = false;
      in->tensors[i] = nullptr;
    } else {
      PyErr_Format(PyExc_TypeError, "%s: input %zu must be a torch.Tensor or None", what, i);
      return false;
    }
  }
  return true;
}

// (inputs, scale) from a vectorcall's arguments: `n_inputs` tensors or None, the scale, then
// `trailing` more arguments the caller parses; false with a Python error set when they are
// not that.
bool parse_call(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, size_t n_inputs,
                Py_ssize_t trailing, const char* what, Inputs* in, double* scale,
                bool lenient = false) {
  if (n_inputs > kMaxInputs || nargs != static_cast<Py_ssize_t>(n_inputs) + 1 + trailing ||
      (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd positional arguments", what,
                 static_cast<Py_ssize_t>(n_inputs) + 1 + trailing);
    return false;
  }
  if (!read_inputs(args, n_inputs, what, in, lenient)) {
    return false;
  }
  *scale = PyFloat_AsDouble(args[n_inputs]);
  return !(*scale == -1.0 && PyErr_Occurred());
}

PyObject* launch_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  State* st = reinterpret_cast<LaunchObject*>(self)->state;
  Inputs in;
  double scale;
  if (!parse_call(args, PyVectorcall_NARGS(nargsf), kwnames, st->inputs.size(), 0,
                  "Launch(*inputs, scale)", &in, &scale)) {
    return nullptr;
  }
  return launch_checked(st, in, scale);
  END_HANDLE_TH_ERRORS
}

// Whether the call's inputs are this launch's: a tensor exactly where it has one (None where
// it has None), each on its device index with its dtype, sizes and strides. (Not whether they
// are plain CUDA tensors: inputs_usable asks that first.)
bool inputs_match(const State* st, const Inputs& in) {
  if (in.n != st->inputs.size()) {
    return false;
  }
  for (size_t i = 0; i < in.n; ++i) {
    const Operand& want = st->inputs[i];
    const at::Tensor* x = in.tensors[i];
    if (x == nullptr) {
      if (want.present) {
        return false;
      }
      continue;
    }
    if (!want.present || x->get_device() != st->device || !layout_matches(want, *x)) {
      return false;
    }
  }
  return true;
}

// The dispatch keys a plain dense CUDA tensor carries (its data, autograd, autocast). Any
// other key means data the kernel must not read directly: a functionalization or functorch
// wrapper (no storage of its own: a null data pointer), a lazily negated or conjugated view,
// a zero tensor, a Python subclass, sparse or nested layouts -- and a CPU tensor.
const c10::DispatchKeySet kPlainCuda({c10::DispatchKey::CUDA, c10::DispatchKey::AutogradCUDA,
                                      c10::DispatchKey::ADInplaceOrView,
                                      c10::DispatchKey::AutocastCUDA});

// Whether a forward-mode AD level is open (torch supports one, index 0; closing it clears every
// tangent): any input may then be a dual tensor -- a dual of torch.autograd.forward_ad or
// torch.func.jvp is a plain tensor by its type and dispatch keys, and a view's tangent is
// only filled in when read -- whose tangent a direct launch would drop. torch's own level
// registry, so a level opened in C++ (AOTAutograd tracing a compiled jvp) counts too.
bool forward_level_open() {
  return torch::autograd::ForwardADLevel::try_get_by_idx(0) != nullptr;
}

// Whether a direct launch may serve these inputs at all, whatever their layouts: plain
// dense CUDA tensors (kPlainCuda; a subclass's own dispatch must run), no dispatch mode
// active (a mode -- a flop counter, FakeTensorMode -- must see the op), none that
// autograd would record (the launch makes no graph: grad mode on and an input requiring grad
// is the custom op's case), and no forward-mode AD level open (the op's autograd kernel
// computes tangents). cpp_launch.plain_cuda is the Python side's copy of these tests.
bool inputs_usable(const Inputs& in) {
  if (!in.plain || cu_launch_kernel == nullptr ||  // no driver: load_driver() was not called
      c10::impl::TorchDispatchModeTLS::any_modes_set() || forward_level_open()) {
    return false;
  }
  const bool grad = c10::GradMode::is_enabled();
  for (size_t i = 0; i < in.n; ++i) {
    const at::Tensor* x = in.tensors[i];
    // (a subset test: DispatchKeySet's operator- keeps backend bits)
    if (x != nullptr && (!kPlainCuda.isSupersetOf(x->key_set()) || !x->is_cuda() ||
                         (grad && x->requires_grad()))) {
      return false;
    }
  }
  return true;
}

// A call for inputs of any layout: None unless they are this launch's. May throw c10 errors
// (an allocation's out-of-memory error among them): callers wrap it in HANDLE_TH_ERRORS,
// which raises the matching Python exception (torch.OutOfMemoryError for that one).
PyObject* launch_checked(State* st, const Inputs& in, double scale) {
  if (!inputs_usable(in) || !inputs_match(st, in)) {
    Py_RETURN_NONE;
  }
  return launch_cuda(st, in, scale);
}

PyObject* launch_cuda(State* st, const Inputs& in, double scale) {
  const c10::Device device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(st->device));
  const c10::impl::DeviceGuardImplInterface* guard =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  if (guard->getDevice() != device) {
    Py_RETURN_NONE;
  }
  int hooks = hooks_active(st);
  if (hooks != 0) {
    if (hooks < 0) {
      return nullptr;
    }
    Py_RETURN_NONE;
  }
  CUcontext ctx = nullptr;
  if (cu_ctx_get_current(&ctx) != 0 || ctx == nullptr) {
    Py_RETURN_NONE;  // no current context on this thread: triton's launcher makes one
  }
  uint64_t in_ptrs[kMaxInputs] = {};
  uint64_t any = 0;
  for (size_t i = 0; i < in.n; ++i) {
    if (in.tensors[i] != nullptr) {
      in_ptrs[i] = reinterpret_cast<uint64_t>(in.tensors[i]->const_data_ptr());
      if (in_ptrs[i] == 0 && st->grid > 0) {
        Py_RETURN_NONE;  // no storage to read (kPlainCuda should have said so already)
      }
      any |= in_ptrs[i];
    }
  }
  if (any & 15) {
    Py_RETURN_NONE;
  }
  // The outputs come straight from the CUDA allocator (the current one: a pluggable allocator
  // is respected) on the current device, which is the launch's (checked above): what
  // at::empty_strided does for CUDA, without the dispatcher and a device guard (with this
  // session's other per-call checks, a Launch call measured 0.5-1.6 us less on the lent H100
  // hosts, session 19), and without its NaN fill under deterministic mode, which
  // would be overwritten anyway: the kernels write every element of their dense outputs.
  c10::Allocator* allocator = at::detail::getCUDAHooks().getCUDADeviceAllocator();
  const c10::DispatchKeySet cuda_keys(c10::DispatchKey::CUDA);
  const size_t n_out = st->outputs.size();
  at::Tensor outs[kMaxOutputs];
  uint64_t out_ptrs[kMaxOutputs] = {};
  for (size_t j = 0; j < n_out; ++j) {
    const Operand& o = st->outputs[j];
    outs[j] = at::detail::empty_strided_generic(o.sizes, o.strides, allocator, cuda_keys,
                                                o.dtype);
    out_ptrs[j] = reinterpret_cast<uint64_t>(outs[j].data_ptr());
    any |= out_ptrs[j];
  }
  if (any & 15) {
    Py_RETURN_NONE;
  }
  if (!st->has_scale || st->last_scale != scale) {
    write_scale(st, scale);
  }
  write_pointers(st, in_ptrs, out_ptrs);
  if (st->grid > 0) {
    CUstream stream = guard->getStream(device).native_handle();
    CUresult rc;
    if (st->pdl) {
      LaunchConfig config{st->grid, 1, 1, st->block, 1, 1, st->shared, stream, &st->pdl_attr, 1};
      rc = cu_launch_kernel_ex(&config, st->function, st->params.data(), nullptr);
    } else {
      rc = cu_launch_kernel(st->function, st->grid, 1, 1, st->block, 1, 1, st->shared, stream,
                            st->params.data(), nullptr);
    }
    if (rc != 0) {
      const char* name = "unknown";
      cu_get_error_name(rc, &name);
      PyErr_Format(PyExc_RuntimeError,
                   "hf_hadamard_kq cpp launch: %s failed with %s (%d)",
                   st->pdl ? "cuLaunchKernelEx" : "cuLaunchKernel", name, rc);
      return nullptr;
    }
  }
  if (n_out == 1) {
    return THPVariable_Wrap(std::move(outs[0]));
  }
  THPObjectPtr result(PyTuple_New(static_cast<Py_ssize_t>(n_out)));
  if (!result) {
    return nullptr;
  }
  for (size_t j = 0; j < n_out; ++j) {
    PyObject* item = THPVariable_Wrap(std::move(outs[j]));
    if (item == nullptr) {
      return nullptr;
    }
    PyTuple_SET_ITEM(result.get(), static_cast<Py_ssize_t>(j), item);
  }
  return result.release();
}

void launch_dealloc(PyObject* self) {
  LaunchObject* obj = reinterpret_cast<LaunchObject*>(self);
  if (obj->state != nullptr) {
    Py_XDECREF(obj->state->runtime);
    Py_XDECREF(obj->state->owner);
    delete obj->state;
    obj->state = nullptr;
  }
  Py_TYPE(self)->tp_free(self);
}

bool as_u64(PyObject* v, uint64_t* out) {
  *out = PyLong_AsUnsignedLongLongMask(v);
  return !(*out == static_cast<uint64_t>(-1) && PyErr_Occurred());
}

// One slot's constant value in its C type (the same conversions as triton's launcher).
bool pack_value(const char* ty, PyObject* value, uint64_t* slot) {
  *slot = 0;
  if (std::strcmp(ty, "fp32") == 0 || std::strcmp(ty, "f32") == 0) {
    double d = PyFloat_AsDouble(value);
    if (d == -1.0 && PyErr_Occurred()) {
      return false;
    }
    float f = static_cast<float>(d);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    *slot = bits;
    return true;
  }
  if (std::strcmp(ty, "i32") == 0) {
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) {
      return false;
    }
    if (v < INT32_MIN || v > INT32_MAX) {
      PyErr_Format(PyExc_OverflowError, "cpp launch: %lld does not fit i32", v);
      return false;
    }
    int32_t v32 = static_cast<int32_t>(v);
    std::memcpy(slot, &v32, sizeof v32);
    return true;
  }
  if (std::strcmp(ty, "i64") == 0) {
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) {
      return false;
    }
    int64_t v64 = v;
    std::memcpy(slot, &v64, sizeof v64);
    return true;
  }
  if (std::strcmp(ty, "u32") == 0) {
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      return false;
    }
    if (v > UINT32_MAX) {
      PyErr_Format(PyExc_OverflowError, "cpp launch: %llu does not fit u32", v);
      return false;
    }
    uint32_t v32 = static_cast<uint32_t>(v);
    std::memcpy(slot, &v32, sizeof v32);
    return true;
  }
  if (std::strcmp(ty, "u64") == 0 || ty[0] == '*') {
    return as_u64(value, slot);
  }
  PyErr_Format(PyExc_ValueError, "cpp launch: unsupported parameter type %s", ty);
  return false;
}

// The layouts of a sequence of templates (tensors, or None where `allow_none`): false with a
// Python error set when it is not one, has no entries or more than `most`.
bool read_operands(PyObject* templates, const char* what, bool allow_none, size_t most,
                   std::vector<Operand>* out) {
  THPObjectPtr seq(PySequence_Fast(templates, "Launch: inputs and outputs must be sequences"));
  if (!seq) {
    return false;
  }
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  if (n < 1 || static_cast<size_t>(n) > most) {
    PyErr_Format(PyExc_ValueError, "Launch: %s must have 1 to %zu entries, got %zd", what, most,
                 n);
    return false;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq.get(), i);
    Operand op;
    if (item == Py_None && allow_none) {
      out->push_back(op);
      continue;
    }
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "Launch: %s[%zd] must be a torch.Tensor%s", what, i,
                   allow_none ? " or None" : "");
      return false;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    op.present = true;
    op.dtype = t.scalar_type();
    op.sizes.assign(t.sizes().begin(), t.sizes().end());
    op.strides.assign(t.strides().begin(), t.strides().end());
    out->push_back(std::move(op));
  }
  return true;
}

// The device of the first present input; -1 (never launched) for CPU templates (tests).
// False with a Python error set when the present inputs are not on one device.
bool inputs_device(PyObject* inputs, int* device) {
  THPObjectPtr seq(PySequence_Fast(inputs, "Launch: inputs must be a sequence"));
  if (!seq) {
    return false;
  }
  bool found = false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq.get()); ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq.get(), i);
    if (item == Py_None || !THPVariable_Check(item)) {
      continue;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    int d = t.is_cuda() ? t.get_device() : -1;
    if (found && d != *device) {
      PyErr_SetString(PyExc_ValueError, "Launch: the inputs are on different devices");
      return false;
    }
    *device = d;
    found = true;
  }
  if (!found) {
    PyErr_SetString(PyExc_ValueError, "Launch: no input is a tensor");
    return false;
  }
  return true;
}

// Launch(function, grid, num_warps, shared, inputs, outputs, slots, runtime, extra_params,
//        owner)
//   inputs: tensors (or None) of the layouts this launch is for -- a call passes tensors of
//   exactly these layouts, None where None is here; outputs: tensors of the layouts (sizes,
//   strides, dtype) to allocate, on the inputs' device (meta tensors will do); slots: a
//   sequence of (type, role, value) for each non-constexpr parameter, in order (a pointer
//   role's value is its input's or output's index); runtime: triton's knobs.runtime or None;
//   extra_params: how many null pointers follow the parameters (triton's scratch pointers);
//   owner: the object that keeps `function` loaded (triton's CompiledKernel), kept alive.
PyObject* launch_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  PyObject *function_obj, *inputs, *outputs, *slots, *runtime, *owner;
  long long grid, num_warps, shared;
  int extra = 0;
  int pdl = 0;
  static const char* names[] = {"function", "grid",    "num_warps",    "shared", "inputs",
                                "outputs",  "slots",   "runtime",      "extra_params",
                                "owner",    "pdl",     nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OLLLOOOOiO|p", const_cast<char**>(names),
                                   &function_obj, &grid, &num_warps, &shared, &inputs, &outputs,
                                   &slots, &runtime, &extra, &owner, &pdl)) {
    return nullptr;
  }
  if (pdl && cu_launch_kernel_ex == nullptr) {
    PyErr_SetString(PyExc_RuntimeError,
                    "Launch: pdl=True needs cuLaunchKernelEx, which this CUDA driver lacks");
    return nullptr;
  }
  if (num_warps < 1 || num_warps > 32 || extra < 0 || extra > 8 || grid < 0 ||
      grid > INT32_MAX || shared < 0 || shared > INT32_MAX) {
    PyErr_SetString(PyExc_ValueError,
                    "Launch: num_warps must be 1-32, extra_params 0-8, grid and shared in "
                    "[0, 2**31)");
    return nullptr;
  }
  uint64_t function = 0;
  if (!as_u64(function_obj, &function)) {
    return nullptr;
  }
  std::unique_ptr<State> st(new State());
  if (!read_operands(inputs, "inputs", true, kMaxInputs, &st->inputs) ||
      !read_operands(outputs, "outputs", false, kMaxOutputs, &st->outputs) ||
      !inputs_device(inputs, &st->device)) {
    return nullptr;
  }
  THPObjectPtr seq(PySequence_Fast(slots, "Launch: slots must be a sequence"));
  if (!seq) {
    return nullptr;
  }
  st->function = reinterpret_cast<CUfunction>(function);
  st->grid = static_cast<unsigned>(grid);
  st->block = static_cast<unsigned>(32 * num_warps);
  st->shared = static_cast<unsigned>(shared);
  st->pdl = pdl != 0;
  st->pdl_attr.id = kAttrProgrammaticStreamSerialization;
  st->pdl_attr.value.value = 1;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  st->storage.assign(n + extra, 0);
  std::vector<bool> in_used(st->inputs.size(), false);
  std::vector<bool> out_used(st->outputs.size(), false);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq.get(), i);
    const char* ty = nullptr;
    int role = -1;
    PyObject* value = nullptr;
    if (!PyArg_ParseTuple(item, "siO", &ty, &role, &value)) {
      return nullptr;
    }
    bool ok = true;
    switch (role) {
      case VALUE:
        ok = pack_value(ty, value, &st->storage[i]);
        break;
      case IN_PTR:
      case OUT_PTR: {
        if (ty[0] != '*') {
          PyErr_Format(PyExc_ValueError, "Launch: slot %zd is a pointer role of type %s", i, ty);
          return nullptr;
        }
        long long index = PyLong_AsLongLong(value);
        if (index == -1 && PyErr_Occurred()) {
          return nullptr;
        }
        const bool in = role == IN_PTR;
        const size_t count = in ? st->inputs.size() : st->outputs.size();
        if (index < 0 || static_cast<size_t>(index) >= count ||
            (in && !st->inputs[index].present)) {
          PyErr_Format(PyExc_ValueError, "Launch: slot %zd names %s %lld, which is not a tensor",
                       i, in ? "input" : "output", index);
          return nullptr;
        }
        (in ? st->in_slots : st->out_slots).emplace_back(i, static_cast<size_t>(index));
        (in ? in_used : out_used)[index] = true;
        break;
      }
      case SCALE:
        if (std::strcmp(ty, "fp32") != 0 && std::strcmp(ty, "f32") != 0) {
          PyErr_Format(PyExc_ValueError, "Launch: the scale slot %zd has type %s", i, ty);
          return nullptr;
        }
        st->scale_slots.push_back(i);
        break;
      default:
        PyErr_Format(PyExc_ValueError, "Launch: unknown role %d", role);
        return nullptr;
    }
    if (!ok) {
      return nullptr;
    }
  }
  for (size_t i = 0; i < in_used.size(); ++i) {
    if (st->inputs[i].present && !in_used[i]) {
      PyErr_Format(PyExc_ValueError, "Launch: no slot takes input %zu", i);
      return nullptr;
    }
  }
  for (size_t j = 0; j < out_used.size(); ++j) {
    if (!out_used[j]) {
      PyErr_Format(PyExc_ValueError, "Launch: no slot takes output %zu", j);
      return nullptr;
    }
  }
  for (auto& slot : st->storage) {
    st->params.push_back(&slot);
  }
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) {
    return nullptr;
  }
  if (runtime != Py_None) {
    Py_INCREF(runtime);
    st->runtime = runtime;
  }
  Py_INCREF(owner);
  st->owner = owner;
  reinterpret_cast<LaunchObject*>(self)->vectorcall = launch_call;
  reinterpret_cast<LaunchObject*>(self)->state = st.release();
  return self;
  END_HANDLE_TH_ERRORS
}

// For tests: the packed parameter bytes for given pointers and scale (no launch, no CUDA).
PyObject* launch_pack(PyObject* self, PyObject* args) {
  HANDLE_TH_ERRORS
  State* st = reinterpret_cast<LaunchObject*>(self)->state;
  PyObject *ins, *outs;
  double scale;
  if (!PyArg_ParseTuple(args, "OOd", &ins, &outs, &scale)) {
    return nullptr;
  }
  uint64_t in_ptrs[kMaxInputs] = {};
  uint64_t out_ptrs[kMaxOutputs] = {};
  PyObject* given[2] = {ins, outs};
  uint64_t* into[2] = {in_ptrs, out_ptrs};
  const size_t want[2] = {st->inputs.size(), st->outputs.size()};
  for (int w = 0; w < 2; ++w) {
    THPObjectPtr seq(PySequence_Fast(given[w], "pack: pointers must be sequences"));
    if (!seq) {
      return nullptr;
    }
    if (static_cast<size_t>(PySequence_Fast_GET_SIZE(seq.get())) != want[w]) {
      PyErr_SetString(PyExc_ValueError, "pack: one pointer per input and per output");
      return nullptr;
    }
    for (size_t i = 0; i < want[w]; ++i) {
      if (!as_u64(PySequence_Fast_GET_ITEM(seq.get(), i), &into[w][i])) {
        return nullptr;
      }
    }
  }
  write_scale(st, scale);
  write_pointers(st, in_ptrs, out_ptrs);
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(st->storage.data()),
                                   static_cast<Py_ssize_t>(st->storage.size() * 8));
  END_HANDLE_TH_ERRORS
}

// For tests: whether a call with these inputs (tensors or None) passes the per-input checks
// (presence, device index, dtype, sizes, strides), whatever their device type.
PyObject* launch_matches(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const State* st = reinterpret_cast<LaunchObject*>(self)->state;
  if (nargs != static_cast<Py_ssize_t>(st->inputs.size())) {
    Py_RETURN_FALSE;
  }
  Inputs in;
  if (!read_inputs(args, static_cast<size_t>(nargs), "matches", &in)) {
    return nullptr;
  }
  return PyBool_FromLong(inputs_match(st, in));
  END_HANDLE_TH_ERRORS
}

// For tests: whether this Launch uses programmatic dependent launch.
PyObject* launch_pdl(PyObject* self, PyObject*) {
  return PyBool_FromLong(reinterpret_cast<LaunchObject*>(self)->state->pdl);
}

// For tests: whether the per-call hook check refuses (mirrors launch.hooks_active).
PyObject* launch_hooks_active(PyObject* self, PyObject*) {
  int r = hooks_active(reinterpret_cast<LaunchObject*>(self)->state);
  if (r < 0) {
    return nullptr;
  }
  return PyBool_FromLong(r);
}

PyMethodDef launch_methods[] = {
    {"pack", launch_pack, METH_VARARGS, "pack(in_ptrs, out_ptrs, scale): the parameter bytes."},
    {"hooks_active", launch_hooks_active, METH_NOARGS, "The per-call launch-hook check."},
    {"pdl", launch_pdl, METH_NOARGS, "Whether it launches with programmatic dependent launch."},
    {"matches", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(launch_matches)),
     METH_FASTCALL, "matches(*inputs): whether they pass the per-input checks."},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject LaunchType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// --- Table: the Launch of each (tag, input layouts), looked up in C++ -----------------------
//
// Why: building the Python key (shapes, strides, dtypes, devices, block) and hashing it cost
// about 1 us per call on the lent H100 hosts, a tenth of the whole rotation.

// How many recently used Launches a Table checks before building a key: a decode step of a
// model whose rotations are not fused alternates a few layouts (query, key) per table.
constexpr size_t kRecent = 4;

struct TableObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  std::unordered_map<std::string, PyObject*>* map;  // owned references to Launch objects
  // Recently hit entries of `map` with their tags (borrowed: valid while the map holds them,
  // so every change of the map forgets them), checked first by the per-input comparison
  // (inputs_match), which decides exactly what the key does -- without building a key.
  PyObject* recent[kRecent];
  int64_t recent_tag[kRecent];
  size_t recent_next;
};

void forget_recent(TableObject* t) {
  for (size_t i = 0; i < kRecent; ++i) {
    t->recent[i] = nullptr;
    t->recent_tag[i] = 0;
  }
  t->recent_next = 0;
}

// Appends one input's part of a layout key: -1 for None, else dtype, device, rank, sizes,
// strides.
void key_operand(std::vector<int64_t>* words, bool present, c10::ScalarType dtype,
                 int64_t device, c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  if (!present) {
    words->push_back(-1);
    return;
  }
  words->push_back(static_cast<int64_t>(dtype));
  words->push_back(device);
  words->push_back(static_cast<int64_t>(sizes.size()));
  words->insert(words->end(), sizes.begin(), sizes.end());
  words->insert(words->end(), strides.begin(), strides.end());
}

// The key of a tag and a list of input parts, as raw int64 bytes.
std::string key_bytes(const std::vector<int64_t>& words) {
  std::string key(words.size() * sizeof(int64_t), '\0');
  std::memcpy(&key[0], words.data(), key.size());
  return key;
}

std::string launch_key(int64_t tag, const State* st) {
  std::vector<int64_t> words{tag, static_cast<int64_t>(st->inputs.size())};
  for (const Operand& op : st->inputs) {
    key_operand(&words, op.present, op.dtype, st->device, op.sizes, op.strides);
  }
  return key_bytes(words);
}

using LaunchMap = std::unordered_map<std::string, PyObject*>;

// Drops a detached map's references (after the table no longer points at it: releasing a
// Launch can run Python, which must not see a half-emptied table).
void release_map(LaunchMap* map) {
  for (auto& kv : *map) {
    Py_DECREF(kv.second);
  }
  delete map;
}

void table_clear_map(TableObject* t) {
  LaunchMap* map = t->map;
  t->map = new LaunchMap();
  forget_recent(t);
  release_map(map);
}

// The Launch a call's inputs (already known usable) and tag select: a recent entry whose
// tag and layouts match, else the map's entry for the key (then remembered as recent);
// borrowed, nullptr when there is none.
PyObject* find_launch(TableObject* t, int64_t tag, const Inputs& in) {
  for (size_t i = 0; i < kRecent; ++i) {
    PyObject* entry = t->recent[i];
    if (entry != nullptr && t->recent_tag[i] == tag &&
        inputs_match(reinterpret_cast<LaunchObject*>(entry)->state, in)) {
      return entry;
    }
  }
  std::vector<int64_t> words{tag, static_cast<int64_t>(in.n)};
  for (size_t i = 0; i < in.n; ++i) {
    const at::Tensor* x = in.tensors[i];
    if (x == nullptr) {
      key_operand(&words, false, c10::ScalarType::Undefined, 0, {}, {});
    } else {
      key_operand(&words, true, x->scalar_type(), x->get_device(), x->sizes(), x->strides());
    }
  }
  auto found = t->map->find(key_bytes(words));
  if (found == t->map->end()) {
    return nullptr;
  }
  t->recent[t->recent_next] = found->second;
  t->recent_tag[t->recent_next] = tag;
  t->recent_next = (t->recent_next + 1) % kRecent;
  return found->second;
}

// table(*inputs, scale, tag) -> the Launch's result (an output, or a tuple of them), or None:
// no Launch for these layouts and tag, inputs it may not serve (inputs_usable: not plain
// dense CUDA tensors, a subclass or a non-tensor, a dispatch mode, autograd), or it declined
PyObject* table_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  TableObject* t = reinterpret_cast<TableObject*>(self);
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (nargs < 3 || nargs > static_cast<Py_ssize_t>(kMaxInputs) + 2) {
    PyErr_Format(PyExc_TypeError, "Table(*inputs, scale, tag) takes 1 to %zu inputs, got %zd",
                 kMaxInputs, nargs - 2);
    return nullptr;
  }
  Inputs in;
  double scale;
  if (!parse_call(args, nargs, kwnames, static_cast<size_t>(nargs - 2), 1,
                  "Table(*inputs, scale, tag)", &in, &scale, /*lenient=*/true)) {
    return nullptr;
  }
  long long tag = PyLong_AsLongLong(args[nargs - 1]);
  if (tag == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  if (!inputs_usable(in)) {
    Py_RETURN_NONE;
  }
  PyObject* entry = find_launch(t, tag, in);
  if (entry == nullptr) {
    Py_RETURN_NONE;
  }
  Py_INCREF(entry);  // the hook check runs Python, which could clear the table
  THPObjectPtr entry_ref(entry);  // released on return and on an exception
  return launch_cuda(reinterpret_cast<LaunchObject*>(entry)->state, in, scale);
  END_HANDLE_TH_ERRORS
}

PyObject* table_add(PyObject* self, PyObject* args) {
  HANDLE_TH_ERRORS
  TableObject* t = reinterpret_cast<TableObject*>(self);
  long long tag;
  PyObject* launch;
  if (!PyArg_ParseTuple(args, "LO!", &tag, &LaunchType, &launch)) {
    return nullptr;
  }
  std::string key = launch_key(tag, reinterpret_cast<LaunchObject*>(launch)->state);
  forget_recent(t);  // an entry may be replaced below
  auto found = t->map->find(key);
  if (found != t->map->end()) {
    PyObject* old = found->second;
    Py_INCREF(launch);
    found->second = launch;
    Py_DECREF(old);
  } else {
    t->map->emplace(std::move(key), launch);  // may throw: the reference is taken after it
    Py_INCREF(launch);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// For tests: the Launch a call of these inputs (tensors or None, of any device) and tag would
// take (find_launch, which also remembers it as recent), or None.
PyObject* table_find(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs < 2 || nargs > static_cast<Py_ssize_t>(kMaxInputs) + 1) {
    PyErr_Format(PyExc_TypeError, "find(tag, *inputs) takes 1 to %zu inputs", kMaxInputs);
    return nullptr;
  }
  long long tag = PyLong_AsLongLong(args[0]);
  if (tag == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  Inputs in;
  if (!read_inputs(args + 1, static_cast<size_t>(nargs - 1), "find", &in)) {
    return nullptr;
  }
  PyObject* entry = find_launch(reinterpret_cast<TableObject*>(self), tag, in);
  if (entry == nullptr) {
    Py_RETURN_NONE;
  }
  Py_INCREF(entry);
  return entry;
  END_HANDLE_TH_ERRORS
}

// For tests: the recently hit entries, as ((tag, Launch), ...), most recent slots first
// filled; () right after any change of the map.
PyObject* table_recent(PyObject* self, PyObject*) {
  TableObject* t = reinterpret_cast<TableObject*>(self);
  THPObjectPtr out(PyList_New(0));
  if (!out) {
    return nullptr;
  }
  for (size_t i = 0; i < kRecent; ++i) {
    if (t->recent[i] == nullptr) {
      continue;
    }
    THPObjectPtr item(Py_BuildValue("(LO)", static_cast<long long>(t->recent_tag[i]),
                                    t->recent[i]));
    if (!item || PyList_Append(out.get(), item.get()) != 0) {
      return nullptr;
    }
  }
  return PyList_AsTuple(out.get());
}

PyObject* table_clear(PyObject* self, PyObject*) {
  table_clear_map(reinterpret_cast<TableObject*>(self));
  Py_RETURN_NONE;
}

Py_ssize_t table_len(PyObject* self) {
  return static_cast<Py_ssize_t>(reinterpret_cast<TableObject*>(self)->map->size());
}

PyObject* table_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  if (PyTuple_GET_SIZE(args) != 0 || (kwargs != nullptr && PyDict_Size(kwargs) != 0)) {
    PyErr_SetString(PyExc_TypeError, "Table() takes no arguments");
    return nullptr;
  }
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) {
    return nullptr;
  }
  reinterpret_cast<TableObject*>(self)->vectorcall = table_call;
  reinterpret_cast<TableObject*>(self)->map = new LaunchMap();
  forget_recent(reinterpret_cast<TableObject*>(self));
  return self;
}

void table_dealloc(PyObject* self) {
  TableObject* t = reinterpret_cast<TableObject*>(self);
  LaunchMap* map = t->map;
  t->map = nullptr;
  forget_recent(t);
  if (map != nullptr) {
    release_map(map);
  }
  Py_TYPE(self)->tp_free(self);
}

PyMethodDef table_methods[] = {
    {"add", table_add, METH_VARARGS, "add(tag, launch): the Launch for its input layouts and tag."},
    {"clear", table_clear, METH_NOARGS, "Forget every Launch."},
    {"find", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(table_find)),
     METH_FASTCALL, "find(tag, *inputs): the Launch a call would take (tests), or None."},
    {"recent", table_recent, METH_NOARGS, "The recently hit (tag, Launch) pairs (tests)."},
    {nullptr, nullptr, 0, nullptr}};

PySequenceMethods table_sequence = {table_len};

PyTypeObject TableType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* load_driver_py(PyObject*, PyObject*) {
  if (!load_driver()) {
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* has_launch_ex_py(PyObject*, PyObject*) {
  return PyBool_FromLong(cu_launch_kernel_ex != nullptr);
}

PyMethodDef module_methods[] = {
    {"load_driver", load_driver_py, METH_NOARGS, "Look up the CUDA driver entry points."},
    {"has_launch_ex", has_launch_ex_py, METH_NOARGS,
     "Whether the driver has cuLaunchKernelEx (needed for Launch(pdl=True))."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "hf_hadamard_kq_cpp_launch",
                          "One cached Triton launch per tensor layout, in C++.", -1,
                          module_methods};

// Fills in a callable (vectorcall) type whose instances start with Object's layout, readies
// it and adds it to the module under `name`; false with a Python error set otherwise.
template <typename Object>
bool add_type(PyObject* m, PyTypeObject* type, const char* name, const char* qualname,
              newfunc make, destructor dealloc, PyMethodDef* methods, const char* doc) {
  type->tp_name = qualname;
  type->tp_basicsize = sizeof(Object);
  type->tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
  type->tp_vectorcall_offset = offsetof(Object, vectorcall);
  type->tp_call = PyVectorcall_Call;
  type->tp_new = make;
  type->tp_dealloc = dealloc;
  type->tp_methods = methods;
  type->tp_doc = doc;
  if (PyType_Ready(type) < 0) {
    return false;
  }
  Py_INCREF(type);
  if (PyModule_AddObject(m, name, reinterpret_cast<PyObject*>(type)) < 0) {
    Py_DECREF(type);
    return false;
  }
  return true;
}

}  // namespace

PyMODINIT_FUNC PyInit_hf_hadamard_kq_cpp_launch() {
  TableType.tp_as_sequence = &table_sequence;
  s_enter = PyUnicode_InternFromString("launch_enter_hook");
  s_exit = PyUnicode_InternFromString("launch_exit_hook");
  s_calls = PyUnicode_InternFromString("calls");
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) {
    return nullptr;
  }
  if (!add_type<LaunchObject>(
          m, &LaunchType, "Launch", "hf_hadamard_kq_cpp_launch.Launch", launch_new,
          launch_dealloc, launch_methods,
          "Launch(function, grid, num_warps, shared, inputs, outputs, slots, runtime, "
          "extra_params, owner): f(*inputs, scale) -> output(s) or None") ||
      !add_type<TableObject>(
          m, &TableType, "Table", "hf_hadamard_kq_cpp_launch.Table", table_new, table_dealloc,
          table_methods, "Table(): t(*inputs, scale, tag) -> output(s) or None; t.add(tag, launch)")) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
