// The eager fast path of one cached Triton launch, in C++ (see cpp_launch.py for why).
//
// A Launch object is made for one tensor layout and one compiled Triton kernel. Calling it
// with (x, scale) checks what its cache cannot know (x's layout, the current device, triton's
// launch hooks, 16-byte alignment, a current CUDA context), allocates the contiguous output
// and launches the kernel with cuLaunchKernel. It returns None, having launched nothing, when
// a check fails: the caller then takes triton's own launch path, which handles every case.
//
// The kernel's parameters are the non-constexpr arguments of its Triton signature, in order,
// each passed by address with its C type (pointers as 64-bit device addresses, fp32 as the
// float's bits), then triton's scratch pointers (null: the kernels cached here use no
// scratch memory). cpp_launch.py builds the slot list from the kernel's own signature and
// checks the result against triton's launcher once per compiled kernel.
//
// No CUDA headers: the few driver entry points are declared here and looked up in
// libcuda.so.1 at first use; the current stream comes from torch's device-guard interface.

#include <Python.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/python_variable.h>
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

LaunchKernelFn cu_launch_kernel = nullptr;
CtxGetCurrentFn cu_ctx_get_current = nullptr;
GetErrorNameFn cu_get_error_name = nullptr;

// Roles of a parameter slot (cpp_launch.py uses the same numbers).
enum Role { VALUE = 0, X_PTR = 1, OUT_PTR = 2, SCALE = 3 };

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
  cu_launch_kernel = launch;
  return true;
}

struct State {
  CUfunction function = nullptr;
  unsigned grid = 0;
  unsigned block = 0;
  unsigned shared = 0;
  int device = 0;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  std::vector<uint64_t> storage;  // one 8-byte slot per parameter
  std::vector<void*> params;      // &storage[i], then the scratch pointers
  std::vector<size_t> x_slots;
  std::vector<size_t> out_slots;
  std::vector<size_t> scale_slots;
  double last_scale = 0.0;
  bool has_scale = false;
  PyObject* runtime = nullptr;  // triton's knobs.runtime (owned), or nullptr
  PyObject* owner = nullptr;    // the triton CompiledKernel (owned): keeps `function` loaded
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

void write_pointers(State* st, uint64_t xp, uint64_t op) {
  for (size_t i : st->x_slots) {
    st->storage[i] = xp;
  }
  for (size_t i : st->out_slots) {
    st->storage[i] = op;
  }
}

bool layout_matches(const State* st, const at::Tensor& x) {
  if (x.scalar_type() != st->dtype) {
    return false;
  }
  auto sizes = x.sizes();
  auto strides = x.strides();
  if (sizes.size() != st->sizes.size()) {
    return false;
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] != st->sizes[i] || strides[i] != st->strides[i]) {
      return false;
    }
  }
  return true;
}

PyObject* launch_cuda(State* st, const at::Tensor& x, double scale);
PyObject* launch_checked(State* st, const at::Tensor& x, double scale);

// (x, scale) from a vectorcall's arguments; false with a Python error set when they are not.
bool parse_call(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, Py_ssize_t want,
                const char* what, double* scale) {
  if (nargs != want || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd positional arguments", what, want);
    return false;
  }
  if (!THPVariable_Check(args[0])) {
    PyErr_Format(PyExc_TypeError, "%s: x must be a torch.Tensor", what);
    return false;
  }
  *scale = PyFloat_AsDouble(args[1]);
  return !(*scale == -1.0 && PyErr_Occurred());
}

PyObject* launch_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  State* st = reinterpret_cast<LaunchObject*>(self)->state;
  double scale;
  if (!parse_call(args, PyVectorcall_NARGS(nargsf), kwnames, 2, "Launch(x, scale)", &scale)) {
    return nullptr;
  }
  return launch_checked(st, THPVariable_Unpack(args[0]), scale);
  END_HANDLE_TH_ERRORS
}

// A call for a tensor of any layout: None unless it is this launch's. May throw c10 errors
// (the allocation's out-of-memory error among them): callers wrap it in HANDLE_TH_ERRORS,
// which raises the matching Python exception (torch.OutOfMemoryError for that one).
PyObject* launch_checked(State* st, const at::Tensor& x, double scale) {
  if (!x.is_cuda() || x.get_device() != st->device || !layout_matches(st, x)) {
    Py_RETURN_NONE;
  }
  if (cu_launch_kernel == nullptr) {
    Py_RETURN_NONE;  // load_driver() was not called: nothing can launch
  }
  return launch_cuda(st, x, scale);
}

PyObject* launch_cuda(State* st, const at::Tensor& x, double scale) {
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
  const uint64_t xp = reinterpret_cast<uint64_t>(x.const_data_ptr());
  if (xp & 15) {
    Py_RETURN_NONE;
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  const uint64_t op = reinterpret_cast<uint64_t>(out.data_ptr());
  if (op & 15) {
    Py_RETURN_NONE;
  }
  if (!st->has_scale || st->last_scale != scale) {
    write_scale(st, scale);
  }
  write_pointers(st, xp, op);
  if (st->grid > 0) {
    CUstream stream = guard->getStream(device).native_handle();
    CUresult rc = cu_launch_kernel(st->function, st->grid, 1, 1, st->block, 1, 1, st->shared,
                                   stream, st->params.data(), nullptr);
    if (rc != 0) {
      const char* name = "unknown";
      cu_get_error_name(rc, &name);
      PyErr_Format(PyExc_RuntimeError,
                   "hf_hadamard_kq cpp launch: cuLaunchKernel failed with %s (%d)", name,
                   rc);
      return nullptr;
    }
  }
  return THPVariable_Wrap(std::move(out));
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

// Launch(function, grid, num_warps, shared, like, slots, runtime, extra_params, owner)
//   slots: a sequence of (type, role, value) for each non-constexpr parameter, in order;
//   like: a tensor of the layout this launch is for; runtime: triton's knobs.runtime or None;
//   extra_params: how many null pointers follow the parameters (triton's scratch pointers);
//   owner: the object that keeps `function` loaded (triton's CompiledKernel), kept alive.
PyObject* launch_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  PyObject *function_obj, *like, *slots, *runtime, *owner;
  long long grid, num_warps, shared;
  int extra = 0;
  static const char* names[] = {"function", "grid", "num_warps", "shared", "like", "slots",
                                "runtime", "extra_params", "owner", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OLLLOOOiO", const_cast<char**>(names),
                                   &function_obj, &grid, &num_warps, &shared, &like, &slots,
                                   &runtime, &extra, &owner)) {
    return nullptr;
  }
  if (!THPVariable_Check(like)) {
    PyErr_SetString(PyExc_TypeError, "Launch: like must be a torch.Tensor");
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
  PyObject* seq = PySequence_Fast(slots, "Launch: slots must be a sequence");
  if (seq == nullptr) {
    return nullptr;
  }
  auto st = new State();
  const at::Tensor& t = THPVariable_Unpack(like);
  st->function = reinterpret_cast<CUfunction>(function);
  st->grid = static_cast<unsigned>(grid);
  st->block = static_cast<unsigned>(32 * num_warps);
  st->shared = static_cast<unsigned>(shared);
  st->device = t.is_cuda() ? t.get_device() : -1;
  st->sizes.assign(t.sizes().begin(), t.sizes().end());
  st->strides.assign(t.strides().begin(), t.strides().end());
  st->dtype = t.scalar_type();
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  st->storage.assign(n + extra, 0);
  bool ok = true;
  for (Py_ssize_t i = 0; i < n && ok; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
    const char* ty = nullptr;
    int role = -1;
    PyObject* value = nullptr;
    if (!PyArg_ParseTuple(item, "siO", &ty, &role, &value)) {
      ok = false;
      break;
    }
    switch (role) {
      case VALUE:
        ok = pack_value(ty, value, &st->storage[i]);
        break;
      case X_PTR:
      case OUT_PTR:
        if (ty[0] != '*') {
          PyErr_Format(PyExc_ValueError, "Launch: slot %zd is a pointer role of type %s", i, ty);
          ok = false;
        } else {
          (role == X_PTR ? st->x_slots : st->out_slots).push_back(i);
        }
        break;
      case SCALE:
        if (std::strcmp(ty, "fp32") != 0 && std::strcmp(ty, "f32") != 0) {
          PyErr_Format(PyExc_ValueError, "Launch: the scale slot %zd has type %s", i, ty);
          ok = false;
        } else {
          st->scale_slots.push_back(i);
        }
        break;
      default:
        PyErr_Format(PyExc_ValueError, "Launch: unknown role %d", role);
        ok = false;
    }
  }
  Py_DECREF(seq);
  if (ok && (st->x_slots.empty() || st->out_slots.empty())) {
    PyErr_SetString(PyExc_ValueError, "Launch: the slots name no x or no output pointer");
    ok = false;
  }
  if (!ok) {
    delete st;
    return nullptr;
  }
  for (auto& slot : st->storage) {
    st->params.push_back(&slot);
  }
  if (runtime != Py_None) {
    Py_INCREF(runtime);
    st->runtime = runtime;
  }
  Py_INCREF(owner);
  st->owner = owner;
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) {
    Py_XDECREF(st->runtime);
    Py_DECREF(st->owner);
    delete st;
    return nullptr;
  }
  reinterpret_cast<LaunchObject*>(self)->vectorcall = launch_call;
  reinterpret_cast<LaunchObject*>(self)->state = st;
  return self;
}

// For tests: the packed parameter bytes for given pointers and scale (no launch, no CUDA).
PyObject* launch_pack(PyObject* self, PyObject* args) {
  State* st = reinterpret_cast<LaunchObject*>(self)->state;
  unsigned long long xp, op;
  double scale;
  if (!PyArg_ParseTuple(args, "KKd", &xp, &op, &scale)) {
    return nullptr;
  }
  write_scale(st, scale);
  write_pointers(st, xp, op);
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(st->storage.data()),
                                   static_cast<Py_ssize_t>(st->storage.size() * 8));
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
    {"pack", launch_pack, METH_VARARGS, "The parameter bytes for (x_ptr, out_ptr, scale)."},
    {"hooks_active", launch_hooks_active, METH_NOARGS, "The per-call launch-hook check."},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject LaunchType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// --- Table: the Launch of each (layout, block), looked up in C++ ---------------------------
//
// Why: building the Python key (shape, strides, dtype, device, block) and hashing it cost
// about 1 us per call on the lent H100 hosts, a tenth of the whole rotation.

struct TableObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  std::unordered_map<std::string, PyObject*>* map;  // owned references to Launch objects
};

// The layout key: block, dtype, device, rank, sizes, strides (as raw int64 bytes).
std::string layout_key(int64_t block, c10::ScalarType dtype, int64_t device, c10::IntArrayRef sizes,
                       c10::IntArrayRef strides) {
  const size_t n = sizes.size();
  std::vector<int64_t> words(4 + 2 * n);
  words[0] = block;
  words[1] = static_cast<int64_t>(dtype);
  words[2] = device;
  words[3] = static_cast<int64_t>(n);
  for (size_t i = 0; i < n; ++i) {
    words[4 + i] = sizes[i];
    words[4 + n + i] = strides[i];
  }
  std::string key(words.size() * sizeof(int64_t), '\0');
  std::memcpy(&key[0], words.data(), key.size());
  return key;
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
  release_map(map);
}

// table(x, scale, block) -> out, or None (no Launch for this layout, or it declined the call)
PyObject* table_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  TableObject* t = reinterpret_cast<TableObject*>(self);
  double scale;
  if (!parse_call(args, PyVectorcall_NARGS(nargsf), kwnames, 3, "Table(x, scale, block)",
                  &scale)) {
    return nullptr;
  }
  long long block = PyLong_AsLongLong(args[2]);
  if (block == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  if (!x.is_cuda()) {
    Py_RETURN_NONE;
  }
  auto found = t->map->find(layout_key(block, x.scalar_type(), x.get_device(), x.sizes(),
                                       x.strides()));
  if (found == t->map->end()) {
    Py_RETURN_NONE;
  }
  PyObject* entry = found->second;
  Py_INCREF(entry);  // the hook check runs Python, which could clear the table
  THPObjectPtr entry_ref(entry);  // released on return and on an exception
  return launch_checked(reinterpret_cast<LaunchObject*>(entry)->state, x, scale);
  END_HANDLE_TH_ERRORS
}

PyObject* table_add(PyObject* self, PyObject* args) {
  TableObject* t = reinterpret_cast<TableObject*>(self);
  long long block;
  PyObject* launch;
  if (!PyArg_ParseTuple(args, "LO!", &block, &LaunchType, &launch)) {
    return nullptr;
  }
  const State* st = reinterpret_cast<LaunchObject*>(launch)->state;
  std::string key = layout_key(block, st->dtype, st->device, st->sizes, st->strides);
  Py_INCREF(launch);
  auto found = t->map->find(key);
  if (found != t->map->end()) {
    PyObject* old = found->second;
    found->second = launch;
    Py_DECREF(old);
  } else {
    t->map->emplace(std::move(key), launch);
  }
  Py_RETURN_NONE;
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
  return self;
}

void table_dealloc(PyObject* self) {
  TableObject* t = reinterpret_cast<TableObject*>(self);
  LaunchMap* map = t->map;
  t->map = nullptr;
  if (map != nullptr) {
    release_map(map);
  }
  Py_TYPE(self)->tp_free(self);
}

PyMethodDef table_methods[] = {
    {"add", table_add, METH_VARARGS, "add(block, launch): the Launch for its layout and block."},
    {"clear", table_clear, METH_NOARGS, "Forget every Launch."},
    {nullptr, nullptr, 0, nullptr}};

PySequenceMethods table_sequence = {table_len};

PyTypeObject TableType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* load_driver_py(PyObject*, PyObject*) {
  if (!load_driver()) {
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"load_driver", load_driver_py, METH_NOARGS, "Look up the CUDA driver entry points."},
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
          "Launch(function, grid, num_warps, shared, like, slots, runtime, extra_params, "
          "owner): f(x, scale) -> out or None") ||
      !add_type<TableObject>(
          m, &TableType, "Table", "hf_hadamard_kq_cpp_launch.Table", table_new, table_dealloc,
          table_methods, "Table(): t(x, scale, block) -> out or None; t.add(block, launch)")) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
