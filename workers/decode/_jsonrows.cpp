// JSON records -> rows of a float64 feature matrix and their ids, without a Python object per value.
//
// workers.decode.records uses it for the usual record: a JSON object whose id is plain text and whose
// features are JSON numbers or null. Anything else in a record (a feature that is text, a boolean, an object;
// an id that is a number, null or escaped text; an escaped key; an integer of 19 digits or more; a number out of
// the double range; invalid JSON or UTF-8; nesting deeper than MAX_DEPTH) makes the record "slow": its row is
// left as it was and its index returned, and the Python decoder reads it (and gives it its reason) exactly as
// before. So the result for every record is what the Python path gives, by construction of what is accepted
// here; tests/test_jsonrows.py checks that differentially (hypothesis) against the Python path.
//
// rows(values, keys, names, id_field, max_id, out) -> (ids, slow)
//   values   a sequence of bytes (anything else, None included: slow)
//   keys     None, or a sequence of bytes | None beside values: the message key stands in for an id that is
//            missing or null (the Python path's key_as_id)
//   names    tuple of str, the model's feature names (the matrix columns)
//   id_field str
//   max_id   the longest id in characters
//   out      a writable C-contiguous float64 buffer of len(values) x len(names), filled with NaN by the caller
//   ids      list: the id (str) of each fast record, None for the slow ones
//   slow     list of the indices of the slow records, ascending
//
// oip_data(head) -> None | (remainder, tensors)
//   The numbers of an Open Inference Protocol REST request's input tensors, without a Python float each
//   (workers/decode/oip.py). head: the request's JSON (bytes). For the usual request (an object whose "inputs"
//   is a list of objects, whose "data" arrays hold only JSON numbers and null, flat or in rows of one level)
//   it gives tensors, a list of (input index, float64 values as a bytearray, rows, cols): rows -1 for a flat
//   array (cols: its length), else the number of rows and their common length (cols -1 when they differ),
//   and remainder: head with each such data array replaced by [] (orjson reads the rest, a few hundred bytes).
//   None (the whole request for the Python path) when head is not valid JSON by the same checks as rows(),
//   spells a key with an escape, repeats "inputs" or an input's "data", or has no such array. A data array with
//   anything else in it (text, true, an empty row, deeper nesting) stays in the remainder, as it was.
//
// The parse runs without the GIL (the values are immutable bytes, held by a list of the function's own); ids
// are made once it is taken back. Numbers: integers of up to 18 digits exactly as int64 -> double (what numpy does with
// Python's int), others with std::from_chars (correctly rounded, locale-free; libstdc++'s is fast_float).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_rows_common.h"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <vector>

namespace {

constexpr int MAX_DEPTH = 128;
using rows_common::Batch;
using rows_common::finish;
using rows_common::id_text;
using rows_common::P;
using rows_common::utf8_len;

inline void skip_ws(P& p, P e) {
    while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) ++p;
}

inline bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

inline int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// A string at p (on its opening quote). On success p is past the closing quote, [start, start+len) is the
// text between the quotes, escaped tells whether it holds a backslash escape. False: not a string JSON allows
// (a control character, a bad escape, an escaped surrogate: the Python path decides those), or bad UTF-8.
inline bool scan_string(P& p, P e, P& start, size_t& len, bool& escaped) {
    ++p;
    start = p;
    escaped = false;
    while (p < e) {
        unsigned char c = *p;
        if (c == '"') {
            len = static_cast<size_t>(p - start);
            ++p;
            return true;
        }
        if (c < 0x20) return false;
        if (c == '\\') {
            escaped = true;
            if (e - p < 2) return false;
            unsigned char x = p[1];
            if (x == 'u') {
                if (e - p < 6) return false;
                int v = 0;
                for (int k = 2; k < 6; ++k) {
                    int h = hexval(p[k]);
                    if (h < 0) return false;
                    v = v * 16 + h;
                }
                if (v >= 0xD800 && v <= 0xDFFF) return false;  // surrogate pairs and lone ones: the slow path
                p += 6;
                continue;
            }
            if (x == '"' || x == '\\' || x == '/' || x == 'b' || x == 'f' || x == 'n' || x == 'r' || x == 't') {
                p += 2;
                continue;
            }
            return false;
        }
        if (c >= 0x80) {
            int n = utf8_len(p, e);
            if (n == 0) return false;
            p += n;
            continue;
        }
        ++p;
    }
    return false;
}

enum class Num { Bad, Value };

// A JSON number at p. On success p is past it and *out its double. Bad: not JSON's grammar, an integer of 19
// digits or more (orjson makes it an inexact float; the Python path keeps it exact), an exponent of more than 4
// digits, or out of the double range (orjson refuses overflow; underflow: the slow path reads it as orjson does).
inline Num scan_number(P& p, P e, double* out) {
    P s = p;
    bool neg = false;
    if (p < e && *p == '-') {
        neg = true;
        ++p;
    }
    if (p >= e || !is_digit(*p)) return Num::Bad;
    P int_start = p;
    // The significant digits as an integer while they fit (mantissa, sig digits counted from the first that
    // is not 0), for the exact fast path below.
    uint64_t mantissa = 0;
    int sig = 0;
    if (*p == '0') {
        ++p;
    } else {
        while (p < e && is_digit(*p)) {
            if (sig < 19) mantissa = mantissa * 10 + (*p - '0');
            ++sig;
            ++p;
        }
    }
    size_t int_digits = static_cast<size_t>(p - int_start);
    bool is_int = true;
    int frac_digits = 0;
    if (p < e && *p == '.') {
        is_int = false;
        ++p;
        if (p >= e || !is_digit(*p)) return Num::Bad;
        while (p < e && is_digit(*p)) {
            if (sig > 0 || *p != '0') {
                if (sig < 19) mantissa = mantissa * 10 + (*p - '0');
                ++sig;
            }
            if (sig <= 19) ++frac_digits;
            ++p;
        }
    }
    int exp10 = 0;
    if (p < e && (*p == 'e' || *p == 'E')) {
        is_int = false;
        ++p;
        bool eneg = false;
        if (p < e && (*p == '+' || *p == '-')) eneg = *p++ == '-';
        P exp_start = p;
        while (p < e && is_digit(*p)) exp10 = exp10 * 10 + (*p++ - '0');
        if (p == exp_start || p - exp_start > 4) return Num::Bad;
        if (eneg) exp10 = -exp10;
    }
    if (int_digits >= 19) return Num::Bad;
    if (is_int) {
        int64_t v = 0;
        for (P q = int_start; q < p; ++q) v = v * 10 + (*q - '0');
        *out = static_cast<double>(neg ? -v : v);
        return Num::Value;
    }
    // Clinger's fast path: a mantissa below 2^53 and a power of ten up to 10^22 are both exact doubles, so one
    // multiplication or division is the correctly rounded value (IEEE 754, SSE2 arithmetic: no extended
    // precision). Everything else: from_chars.
    static const double pow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                   1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    int net = exp10 - frac_digits;
    if (sig <= 19 && mantissa <= (uint64_t(1) << 53) && net >= -22 && net <= 22) {
        double m = static_cast<double>(mantissa);
        double d = net < 0 ? m / pow10[-net] : m * pow10[net];
        *out = neg ? -d : d;
        return Num::Value;
    }
    double d;
    auto r = std::from_chars(reinterpret_cast<const char*>(s), reinterpret_cast<const char*>(p), d);
    if (r.ec != std::errc() || r.ptr != reinterpret_cast<const char*>(p) || !std::isfinite(d)) return Num::Bad;
    *out = d;
    return Num::Value;
}

bool skip_value(P& p, P e, int depth);

inline bool skip_literal(P& p, P e, const char* word, size_t n) {
    if (static_cast<size_t>(e - p) < n || std::memcmp(p, word, n) != 0) return false;
    p += n;
    return true;
}

enum class Next { More, Done, Bad };

// After an item of a list or object closed by close: More (a comma, skipped with the whitespace after it),
// Done (the close, skipped) or Bad.
inline Next next_item(P& p, P e, unsigned char close) {
    skip_ws(p, e);
    if (p < e && *p == ',') {
        ++p;
        skip_ws(p, e);
        return Next::More;
    }
    if (p < e && *p == close) {
        ++p;
        return Next::Done;
    }
    return Next::Bad;
}

// A key at p (on its quote) and the colon after it -> its text; false for an escaped key (the Python path
// compares keys unescaped) or a bad string.
inline bool read_key(P& p, P e, std::string_view& key) {
    if (p >= e || *p != '"') return false;
    P s;
    size_t n;
    bool esc;
    if (!scan_string(p, e, s, n, esc) || esc) return false;
    key = std::string_view(reinterpret_cast<const char*>(s), n);
    skip_ws(p, e);
    if (p >= e || *p != ':') return false;
    ++p;
    skip_ws(p, e);
    return true;
}

// A number or null at p into *out (null: NaN); false for anything else (text, a boolean, an object...).
inline bool read_number(P& p, P e, double* out) {
    if (p < e && *p == 'n') {
        if (!skip_literal(p, e, "null", 4)) return false;
        *out = NAN;
        return true;
    }
    return scan_number(p, e, out) == Num::Value;
}

// Any JSON value (validated, not kept).
bool skip_value(P& p, P e, int depth) {
    if (p >= e) return false;
    unsigned char c = *p;
    if (c == '"') {
        P s;
        size_t n;
        bool esc;
        return scan_string(p, e, s, n, esc);
    }
    if (c == '{' || c == '[') {
        if (depth >= MAX_DEPTH) return false;
        bool obj = c == '{';
        unsigned char close = obj ? '}' : ']';
        ++p;
        skip_ws(p, e);
        if (p < e && *p == close) {
            ++p;
            return true;
        }
        while (true) {
            if (obj) {
                if (p >= e || *p != '"') return false;
                P s;
                size_t n;
                bool esc;
                if (!scan_string(p, e, s, n, esc)) return false;  // escaped keys too: nothing compares them
                skip_ws(p, e);
                if (p >= e || *p != ':') return false;
                ++p;
                skip_ws(p, e);
            }
            if (!skip_value(p, e, depth + 1)) return false;
            Next next = next_item(p, e, close);
            if (next != Next::More) return next == Next::Done;
        }
    }
    if (c == 't') return skip_literal(p, e, "true", 4);
    if (c == 'f') return skip_literal(p, e, "false", 5);
    if (c == 'n') return skip_literal(p, e, "null", 4);
    double ignored;
    return scan_number(p, e, &ignored) == Num::Value;
}

struct Names {
    std::vector<std::string> names;
    std::unordered_map<std::string_view, int> index;
};

// Where the id of a fast record is: in its value (start, len) or, with from_key, the whole key.
struct IdSpan {
    P start = nullptr;
    size_t len = 0;
    bool from_key = false;
};

// One record into row[0..width). True: fast (row and id filled). False: slow (row may be partly written:
// the caller resets it to NaN).
bool parse_record(P p, P e, const Names& names, std::string_view id_field, int id_col, double* row, IdSpan& id,
                  bool key_given) {
    const int width = static_cast<int>(names.names.size());
    skip_ws(p, e);
    if (p >= e || *p != '{') return false;
    ++p;
    skip_ws(p, e);
    enum { Missing, Text, Null } id_kind = Missing;
    int hint = 0;
    if (p < e && *p == '}') {
        ++p;
    } else {
        while (true) {
            std::string_view key;
            if (!read_key(p, e, key)) return false;
            int j = -1;
            if (hint < width && names.names[hint] == key) {
                j = hint;
            } else {
                auto it = names.index.find(key);
                if (it != names.index.end()) j = it->second;
            }
            if (j >= 0) {
                if (j == id_col) return false;  // the id field is also a feature: the Python path reads it as both
                hint = j + 1;
                // text, a boolean, an object...: the Python path (a category or a reason)
                if (!read_number(p, e, &row[j])) return false;
            } else if (key == id_field) {
                if (p < e && *p == '"') {
                    P s;
                    size_t n;
                    bool esc;
                    if (!scan_string(p, e, s, n, esc) || esc) return false;
                    id.start = s;
                    id.len = n;
                    id_kind = Text;
                } else if (p < e && *p == 'n') {
                    if (!skip_literal(p, e, "null", 4)) return false;
                    id_kind = Null;
                } else {
                    return false;  // a number or anything else as the id: the Python path
                }
            } else if (!skip_value(p, e, 1)) {
                return false;
            }
            Next next = next_item(p, e, '}');
            if (next == Next::Bad) return false;
            if (next == Next::Done) break;
        }
    }
    skip_ws(p, e);
    if (p != e) return false;
    if (id_kind != Text) {
        if (!key_given) return false;
        id.from_key = true;
    }
    return true;
}

PyObject* rows(PyObject*, PyObject* args) {
    PyObject *values_arg, *keys_arg, *names_obj, *out;
    const char* id_field;
    Py_ssize_t id_field_len, max_id;
    if (!PyArg_ParseTuple(args, "OOO!s#nO", &values_arg, &keys_arg, &PyTuple_Type, &names_obj, &id_field,
                          &id_field_len, &max_id, &out))
        return nullptr;
    Names names;
    const Py_ssize_t width = PyTuple_GET_SIZE(names_obj);
    names.names.reserve(static_cast<size_t>(width));
    for (Py_ssize_t j = 0; j < width; ++j) {
        Py_ssize_t len;
        const char* s = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(names_obj, j), &len);
        if (s == nullptr) return nullptr;
        names.names.emplace_back(s, static_cast<size_t>(len));
    }
    for (Py_ssize_t j = 0; j < width; ++j) {
        // A name given twice keeps its first column, as itemgetter reads the same value into both: rare enough
        // to leave to the Python path.
        if (!names.index.emplace(std::string_view(names.names[static_cast<size_t>(j)]), static_cast<int>(j)).second) {
            PyErr_SetString(PyExc_ValueError, "feature names must be distinct");
            return nullptr;
        }
    }
    Batch batch;
    if (!batch.open(values_arg, keys_arg, out, width)) return nullptr;
    const Py_ssize_t n = batch.n;
    std::vector<P> starts(static_cast<size_t>(n), nullptr), ends(static_cast<size_t>(n), nullptr);
    std::vector<char> key_given(static_cast<size_t>(n), 0);
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* v = batch.value(i);
        if (PyBytes_Check(v)) {
            starts[static_cast<size_t>(i)] = reinterpret_cast<P>(PyBytes_AS_STRING(v));
            ends[static_cast<size_t>(i)] = starts[static_cast<size_t>(i)] + PyBytes_GET_SIZE(v);
        }
        key_given[static_cast<size_t>(i)] = batch.key(i) != nullptr;
    }
    std::vector<IdSpan> ids(static_cast<size_t>(n));
    std::vector<char> fast(static_cast<size_t>(n), 0);
    std::string_view idf(id_field, static_cast<size_t>(id_field_len));
    auto id_at = names.index.find(idf);
    const int id_col = id_at == names.index.end() ? -1 : id_at->second;
    double* matrix = batch.matrix;

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; ++i) {
        size_t k = static_cast<size_t>(i);
        if (starts[k] == nullptr) continue;
        fast[k] = parse_record(starts[k], ends[k], names, idf, id_col, matrix + i * width, ids[k], key_given[k] != 0);
    }
    Py_END_ALLOW_THREADS

    return finish(batch, fast, [&](Py_ssize_t i) -> PyObject* {
        const IdSpan& s = ids[static_cast<size_t>(i)];
        if (s.from_key) {
            PyObject* key = batch.key(i);
            return id_text(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), max_id);
        }
        return id_text(reinterpret_cast<const char*>(s.start), static_cast<Py_ssize_t>(s.len), max_id);
    });
}

// -- oip_data ------------------------------------------------------------------------------------------

struct OipTensor {
    Py_ssize_t index;
    P start, end;  // the data array's bytes in head
    std::vector<double> values;
    Py_ssize_t rows, cols;
};

// A data array at p ('['): numbers and null, flat or in rows (arrays of them) of one level. False: anything
// else (p is then meaningless: the caller validates the value again from its start).
bool oip_array(P& p, P e, OipTensor& t) {
    ++p;
    skip_ws(p, e);
    if (p >= e || *p == ']') return false;  // empty: the Python path decides
    bool nested = *p == '[';
    t.rows = nested ? 0 : -1;
    t.cols = 0;
    while (true) {
        if (nested) {
            if (p >= e || *p != '[') return false;
            ++p;
            skip_ws(p, e);
            Py_ssize_t n = 0;
            if (p < e && *p == ']') return false;  // an empty row
            while (true) {
                t.values.push_back(0);
                if (!read_number(p, e, &t.values.back())) return false;
                ++n;
                Next next = next_item(p, e, ']');
                if (next == Next::Bad) return false;
                if (next == Next::Done) break;
            }
            if (t.rows == 0) t.cols = n;
            else if (t.cols != n) t.cols = -1;
            ++t.rows;
        } else {
            t.values.push_back(0);
            if (!read_number(p, e, &t.values.back())) return false;
            ++t.cols;
        }
        Next next = next_item(p, e, ']');
        if (next != Next::More) return next == Next::Done;
    }
}

// One element of "inputs" at p: an object gives at most one tensor; anything else is only validated.
bool oip_input(P& p, P e, Py_ssize_t index, std::vector<OipTensor>& out) {
    if (p >= e || *p != '{') return skip_value(p, e, 2);
    ++p;
    skip_ws(p, e);
    if (p < e && *p == '}') {
        ++p;
        return true;
    }
    bool seen_data = false;
    while (true) {
        std::string_view key;
        if (!read_key(p, e, key)) return false;
        if (key == "data") {
            if (seen_data) return false;  // repeated: orjson keeps the last; the Python path reads it
            seen_data = true;
            P at = p;
            OipTensor t;
            t.index = index;
            if (p < e && *p == '[' && oip_array(p, e, t)) {
                t.start = at;
                t.end = p;
                out.push_back(std::move(t));
            } else {
                p = at;
                if (!skip_value(p, e, 3)) return false;
            }
        } else if (!skip_value(p, e, 3)) {
            return false;
        }
        Next next = next_item(p, e, '}');
        if (next != Next::More) return next == Next::Done;
    }
}

// The whole request; false: the Python path.
bool oip_request(P p, P e, std::vector<OipTensor>& out) {
    skip_ws(p, e);
    if (p >= e || *p != '{') return false;
    ++p;
    skip_ws(p, e);
    bool seen_inputs = false;
    if (p < e && *p == '}') return false;
    while (true) {
        std::string_view key;
        if (!read_key(p, e, key)) return false;
        if (key == "inputs") {
            if (seen_inputs) return false;
            seen_inputs = true;
            if (p < e && *p == '[') {
                ++p;
                skip_ws(p, e);
                if (p < e && *p == ']') {
                    ++p;
                } else {
                    for (Py_ssize_t i = 0;; ++i) {
                        if (!oip_input(p, e, i, out)) return false;
                        Next next = next_item(p, e, ']');
                        if (next == Next::Bad) return false;
                        if (next == Next::Done) break;
                    }
                }
            } else if (!skip_value(p, e, 1)) {
                return false;
            }
        } else if (!skip_value(p, e, 1)) {
            return false;
        }
        Next next = next_item(p, e, '}');
        if (next == Next::Bad) return false;
        if (next == Next::Done) break;
    }
    skip_ws(p, e);
    return p == e && !out.empty();
}

PyObject* oip_data(PyObject*, PyObject* args) {
    PyObject* head;
    if (!PyArg_ParseTuple(args, "O!", &PyBytes_Type, &head)) return nullptr;
    Py_INCREF(head);  // bytes are immutable; held while the GIL is released
    P start = reinterpret_cast<P>(PyBytes_AS_STRING(head));
    P end = start + PyBytes_GET_SIZE(head);
    std::vector<OipTensor> tensors;
    bool ok;
    std::string remainder;
    Py_BEGIN_ALLOW_THREADS
    ok = oip_request(start, end, tensors);
    if (ok) {
        P at = start;
        for (const OipTensor& t : tensors) {
            remainder.append(reinterpret_cast<const char*>(at), static_cast<size_t>(t.start - at));
            remainder.append("[]");
            at = t.end;
        }
        remainder.append(reinterpret_cast<const char*>(at), static_cast<size_t>(end - at));
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(head);
    if (!ok) Py_RETURN_NONE;
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(tensors.size()));
    if (list == nullptr) return nullptr;
    for (size_t k = 0; k < tensors.size(); ++k) {
        const OipTensor& t = tensors[k];
        PyObject* values = PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(t.values.data()),
                                                         static_cast<Py_ssize_t>(t.values.size() * sizeof(double)));
        if (values == nullptr) {
            Py_DECREF(list);
            return nullptr;
        }
        PyObject* item = Py_BuildValue("(nNnn)", t.index, values, t.rows, t.cols);
        if (item == nullptr) {
            Py_DECREF(list);
            return nullptr;
        }
        PyList_SET_ITEM(list, static_cast<Py_ssize_t>(k), item);
    }
    return Py_BuildValue("(y#N)", remainder.data(), static_cast<Py_ssize_t>(remainder.size()), list);
}

PyMethodDef methods[] = {
    {"rows", rows, METH_VARARGS, "JSON records -> feature rows and ids (see workers/decode/_jsonrows.cpp)."},
    {"oip_data", oip_data, METH_VARARGS, "An OIP REST request's tensor numbers (see workers/decode/_jsonrows.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonrows", nullptr, -1, methods, nullptr, nullptr, nullptr,
                      nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__jsonrows(void) { return PyModule_Create(&module); }
