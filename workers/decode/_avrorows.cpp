// Confluent-wire Avro records -> rows of a float64 feature matrix and their ids, without a Python object per
// value: the registry-format counterpart of _jsonrows.cpp, for flat record schemas.
//
// workers.decode.wire.AvroFormat compiles a "program" per writer schema id and decoder (avro_program): one
// entry per field of the record, in the schema's order, saying how to read it and where it goes (a feature
// column, the id, or nowhere). Schemas the program cannot describe (logical types, named or nested types,
// arrays, maps, unions of anything but primitives) get none; their records stay on the Python path.
//
// A record is "fast" when its value starts with a header (magic byte 0 + schema id) that has a program, every
// field reads well formed in the strictest sense the Python compiled reader (avrofast.py) uses (booleans 0 or
// 1, varints of at most 10 bytes and 64 bits, lengths and indexes in range, strict UTF-8, nothing left over), its
// features are numbers or null and its id is text of 1..max_id characters (or a long, shown as its decimal
// text; or, null or absent, the message key when keys are given). Anything else makes it "slow": its row is
// reset to NaN and its index returned, and the Python path reads it exactly as before (value or reason).
//
// rows(values, programs, keys, width, max_id, out) -> (ids, slow)
//   values    a sequence of bytes (anything else: slow)
//   programs  dict: 5-byte header -> tuple of ints (see Op below, flattened)
//   keys      None, or a sequence of bytes | None beside values (the message key as the id)
//   width     the number of feature columns
//   out       a writable C-contiguous float64 buffer of len(values) x width, NaN-filled by the caller

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_rows_common.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using rows_common::Batch;
using rows_common::finish;
using rows_common::id_text;
using rows_common::P;
using rows_common::utf8_len;

// Kinds of a value, as the program numbers them (avro_program in workers/decode/wire.py).
enum Kind { K_NULL = 0, K_BOOL = 1, K_LONG = 2, K_FLOAT = 3, K_DOUBLE = 4, K_STRING = 5, K_BYTES = 6, K_ENUM = 7,
            K_FIXED = 8, K_UNION = 9 };
constexpr int DEST_SKIP = -1;
constexpr int DEST_ID = -2;

struct Branch {
    int kind;
    int64_t extra;  // enum: the number of symbols; fixed: the size
};

struct Field {
    int dest;  // a feature column, DEST_ID or DEST_SKIP
    std::vector<Branch> branches;  // one for a plain type; a union's, in order
    bool is_union;
};

// A zigzag varint at p: at most 10 bytes, at most 64 bits (as avrofast._long accepts).
inline bool read_long(P& p, P e, int64_t& out) {
    uint64_t result = 0;
    int shift = 0;
    while (true) {
        if (p >= e) return false;
        unsigned char b = *p++;
        if (shift == 63 && (b & 0x7E)) return false;  // bits beyond 64
        result |= static_cast<uint64_t>(b & 0x7F) << shift;
        if (!(b & 0x80)) break;
        shift += 7;
        if (shift >= 70) return false;
    }
    out = static_cast<int64_t>((result >> 1) ^ (~(result & 1) + 1));
    return true;
}

// Strict UTF-8 (Python's bytes.decode()): ASCII runs fast.
inline bool valid_utf8(P p, P e) {
    while (p < e) {
        if (*p < 0x80) {
            ++p;
            continue;
        }
        int n = utf8_len(p, e);
        if (n == 0) return false;
        p += n;
    }
    return true;
}

struct IdOut {
    enum { None, Text, Number, Null } kind = None;
    P start = nullptr;
    size_t len = 0;
    int64_t number = 0;
};

// One value of ``kind`` at p into dest. False: slow.
inline bool read_value(P& p, P e, const Branch& b, int dest, double* row, IdOut& id) {
    switch (b.kind) {
        case K_NULL:
            if (dest == DEST_ID) id.kind = IdOut::Null;
            if (dest >= 0) row[dest] = NAN;  // missing (also over an earlier field of the same name)
            return true;
        case K_BOOL: {
            if (p >= e || *p > 1) return false;
            ++p;
            return dest == DEST_SKIP;  // a boolean feature or id: the Python path's reason
        }
        case K_LONG: {
            int64_t v;
            if (!read_long(p, e, v)) return false;
            if (dest >= 0) {
                row[dest] = static_cast<double>(v);
            } else if (dest == DEST_ID) {
                id.kind = IdOut::Number;
                id.number = v;
            }
            return true;
        }
        case K_FLOAT: {
            if (e - p < 4) return false;
            float f;
            std::memcpy(&f, p, 4);  // little-endian, as x86-64 and aarch64 are
            p += 4;
            if (dest >= 0) row[dest] = static_cast<double>(f);
            return dest != DEST_ID;
        }
        case K_DOUBLE: {
            if (e - p < 8) return false;
            double d;
            std::memcpy(&d, p, 8);
            p += 8;
            if (dest >= 0) row[dest] = d;
            return dest != DEST_ID;
        }
        case K_STRING:
        case K_BYTES: {
            int64_t n;
            if (!read_long(p, e, n) || n < 0 || n > e - p) return false;
            P s = p;
            p += n;
            if (b.kind == K_STRING && !valid_utf8(s, p)) return false;
            if (dest == DEST_ID && b.kind == K_STRING) {
                id.kind = IdOut::Text;
                id.start = s;
                id.len = static_cast<size_t>(n);
                return true;
            }
            return dest == DEST_SKIP;  // text as a feature: a category or a reason, in Python
        }
        case K_ENUM: {
            int64_t i;
            if (!read_long(p, e, i) || i < 0 || i >= b.extra) return false;
            return dest == DEST_SKIP;
        }
        case K_FIXED: {
            if (e - p < b.extra) return false;
            p += b.extra;
            return dest == DEST_SKIP;
        }
        default:
            return false;
    }
}

bool parse_record(P p, P e, const std::vector<Field>& fields, double* row, IdOut& id) {
    for (const Field& f : fields) {
        if (f.is_union) {
            int64_t u;
            if (!read_long(p, e, u) || u < 0 || u >= static_cast<int64_t>(f.branches.size())) return false;
            if (!read_value(p, e, f.branches[static_cast<size_t>(u)], f.dest, row, id)) return false;
        } else if (!read_value(p, e, f.branches[0], f.dest, row, id)) {
            return false;
        }
    }
    return p == e;
}

// A program (tuple of ints): per field dest, is_union (0/1), the number of branches, then (kind, extra) each.
bool load_program(PyObject* tuple, Py_ssize_t width, std::vector<Field>& out) {
    if (!PyTuple_Check(tuple)) return false;
    Py_ssize_t n = PyTuple_GET_SIZE(tuple), i = 0;
    auto next = [&](int64_t& v) {
        if (i >= n) return false;
        v = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, i++));
        return !(v == -1 && PyErr_Occurred());
    };
    while (i < n) {
        int64_t dest, is_union, count;
        if (!next(dest) || !next(is_union) || !next(count) || count < 1 || dest < DEST_ID || dest >= width)
            return false;
        Field f{static_cast<int>(dest), {}, is_union != 0};
        for (int64_t k = 0; k < count; ++k) {
            int64_t kind, extra;
            if (!next(kind) || !next(extra) || kind < K_NULL || kind > K_FIXED || extra < 0) return false;
            f.branches.push_back(Branch{static_cast<int>(kind), extra});
        }
        out.push_back(std::move(f));
    }
    return true;
}

PyObject* rows(PyObject*, PyObject* args) {
    PyObject *values_arg, *programs, *keys_arg, *out;
    Py_ssize_t width, max_id;
    if (!PyArg_ParseTuple(args, "OO!OnnO", &values_arg, &PyDict_Type, &programs, &keys_arg, &width, &max_id, &out))
        return nullptr;
    std::unordered_map<std::string, std::vector<Field>> progs;
    PyObject *hk, *hv;
    Py_ssize_t pos = 0;
    while (PyDict_Next(programs, &pos, &hk, &hv)) {
        if (!PyBytes_Check(hk) || PyBytes_GET_SIZE(hk) != 5) continue;
        std::vector<Field> fields;
        if (!load_program(hv, width, fields)) {  // a program it cannot use: that schema's records stay slow
            PyErr_Clear();
            continue;
        }
        progs.emplace(std::string(PyBytes_AS_STRING(hk), 5), std::move(fields));
    }
    Batch batch;
    if (!batch.open(values_arg, keys_arg, out, width)) return nullptr;
    const Py_ssize_t n = batch.n;
    std::vector<P> starts(static_cast<size_t>(n), nullptr), ends(static_cast<size_t>(n), nullptr);
    std::vector<const std::vector<Field>*> prog_of(static_cast<size_t>(n), nullptr);
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* v = batch.value(i);
        if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) < 5) continue;
        auto it = progs.find(std::string(PyBytes_AS_STRING(v), 5));
        if (it == progs.end()) continue;
        size_t k = static_cast<size_t>(i);
        prog_of[k] = &it->second;
        starts[k] = reinterpret_cast<P>(PyBytes_AS_STRING(v)) + 5;
        ends[k] = reinterpret_cast<P>(PyBytes_AS_STRING(v)) + PyBytes_GET_SIZE(v);
    }
    std::vector<IdOut> ids(static_cast<size_t>(n));
    std::vector<char> fast(static_cast<size_t>(n), 0);
    double* matrix = batch.matrix;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; ++i) {
        size_t k = static_cast<size_t>(i);
        if (prog_of[k] != nullptr) fast[k] = parse_record(starts[k], ends[k], *prog_of[k], matrix + i * width, ids[k]);
    }
    Py_END_ALLOW_THREADS

    return finish(batch, fast, [&](Py_ssize_t i) -> PyObject* {
        const IdOut& s = ids[static_cast<size_t>(i)];
        if (s.kind == IdOut::Text)
            return id_text(reinterpret_cast<const char*>(s.start), static_cast<Py_ssize_t>(s.len), max_id);
        if (s.kind == IdOut::Number) {
            PyObject* text = PyUnicode_FromFormat("%lld", static_cast<long long>(s.number));
            if (text == nullptr) PyErr_Clear();
            return text;
        }
        PyObject* key = batch.key(i);  // null or absent: the message key stands in
        return key == nullptr ? nullptr : id_text(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), max_id);
    });
}

PyMethodDef methods[] = {
    {"rows", rows, METH_VARARGS, "Avro records -> feature rows and ids (see workers/decode/_avrorows.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_avrorows", nullptr, -1, methods, nullptr, nullptr, nullptr,
                      nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__avrorows(void) { return PyModule_Create(&module); }
