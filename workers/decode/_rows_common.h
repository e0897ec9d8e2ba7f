// What the native record readers (_jsonrows.cpp, _avrorows.cpp) share: a strong reference holder, strict
// UTF-8 (as Python's bytes.decode() accepts it), taking the values, keys and output matrix (Batch), and making
// the ids and the list of slow records once the parse is done (finish).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <vector>

namespace rows_common {

typedef const unsigned char* P;

// A strong reference, released when it goes out of scope.
class Owned {
  public:
    explicit Owned(PyObject* o = nullptr) : o_(o) {}
    ~Owned() { Py_XDECREF(o_); }
    Owned(const Owned&) = delete;
    Owned& operator=(const Owned&) = delete;
    PyObject* get() const { return o_; }
    void reset(PyObject* o) {
        Py_XDECREF(o_);
        o_ = o;
    }
    PyObject* release() {
        PyObject* o = o_;
        o_ = nullptr;
        return o;
    }
    explicit operator bool() const { return o_ != nullptr; }

  private:
    PyObject* o_;
};

// One UTF-8 sequence starting at p (a byte >= 0x80): its length, or 0 when it is not well formed (overlong,
// a surrogate, beyond U+10FFFF, truncated).
inline int utf8_len(P p, P e) {
    unsigned char c = p[0];
    if (c >= 0xC2 && c <= 0xDF) {
        return (e - p >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (e - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && p[1] < 0xA0) return 0;  // overlong
        if (c == 0xED && p[1] >= 0xA0) return 0;  // a surrogate
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (e - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if (c == 0xF0 && p[1] < 0x90) return 0;  // overlong
        if (c == 0xF4 && p[1] >= 0x90) return 0;  // beyond U+10FFFF
        return 4;
    }
    return 0;
}

// A reader's values, keys and output matrix. Lists of our own hold a reference to every value and key while
// the GIL is released, so another thread changing the caller's lists cannot free the bytes being read.
struct Batch {
    Owned values, keys;
    Py_ssize_t n = 0, width = 0;
    Py_buffer buf{};
    bool have_buf = false;
    double* matrix = nullptr;

    Batch() = default;
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;
    ~Batch() {
        if (have_buf) PyBuffer_Release(&buf);
    }

    // values: a sequence; keys: None or a sequence as long; out: a writable C-contiguous float64 buffer of
    // len(values) x width. False with a Python exception set.
    bool open(PyObject* values_arg, PyObject* keys_arg, PyObject* out, Py_ssize_t cols) {
        width = cols;
        values.reset(PySequence_List(values_arg));
        if (!values) return false;
        n = PyList_GET_SIZE(values.get());
        if (keys_arg != Py_None) {
            keys.reset(PySequence_List(keys_arg));
            if (!keys) return false;
            if (PyList_GET_SIZE(keys.get()) != n) {
                PyErr_SetString(PyExc_ValueError, "keys must be None or as long as values");
                return false;
            }
        }
        if (PyObject_GetBuffer(out, &buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return false;
        have_buf = true;
        if (buf.len != static_cast<Py_ssize_t>(n * width * sizeof(double))) {
            PyErr_SetString(PyExc_ValueError, "out must hold len(values) x width float64 values");
            return false;
        }
        matrix = static_cast<double*>(buf.buf);
        return true;
    }

    PyObject* value(Py_ssize_t i) const { return PyList_GET_ITEM(values.get(), i); }
    // The key beside value i when it is bytes (it may stand in for the id), else nullptr.
    PyObject* key(Py_ssize_t i) const {
        if (!keys) return nullptr;
        PyObject* k = PyList_GET_ITEM(keys.get(), i);
        return PyBytes_Check(k) ? k : nullptr;
    }
    void blank(Py_ssize_t i) {
        double* row = matrix + i * width;
        for (Py_ssize_t j = 0; j < width; ++j) row[j] = NAN;
    }
};

// Text of 1..max_id characters from UTF-8 bytes, or nullptr (no exception): not UTF-8, empty, too long.
inline PyObject* id_text(const char* s, Py_ssize_t len, Py_ssize_t max_id) {
    PyObject* rid = PyUnicode_DecodeUTF8(s, len, "strict");
    if (rid == nullptr) {
        PyErr_Clear();
    } else if (PyUnicode_GET_LENGTH(rid) < 1 || PyUnicode_GET_LENGTH(rid) > max_id) {
        Py_CLEAR(rid);
    }
    return rid;
}

// (ids, slow) once the parse is done: make_id(i) gives a fast record's id (a new reference) or nullptr (no
// exception), which makes it slow too; a slow record's row is blanked and its id is None.
template <class MakeId>
PyObject* finish(Batch& b, const std::vector<char>& fast, MakeId make_id) {
    Owned ids(PyList_New(b.n));
    Owned slow(PyList_New(0));
    if (!ids || !slow) return nullptr;
    for (Py_ssize_t i = 0; i < b.n; ++i) {
        PyObject* rid = fast[static_cast<size_t>(i)] ? make_id(i) : nullptr;
        if (rid == nullptr) {
            b.blank(i);
            Owned idx(PyLong_FromSsize_t(i));
            if (!idx || PyList_Append(slow.get(), idx.get()) < 0) return nullptr;
            Py_INCREF(Py_None);
            rid = Py_None;
        }
        PyList_SET_ITEM(ids.get(), i, rid);
    }
    return Py_BuildValue("(NN)", ids.release(), slow.release());
}

}  // namespace rows_common
