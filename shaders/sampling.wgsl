// Token sampling over rows of logits [N, V]. One workgroup per row (the row index folded
// over the x/y grid); every reduction is a fixed-order tree in workgroup memory and there are no atomics, so the
// same logits and u give the same ids on every run.
//
// Tokens are ranked by logit, highest first, ties by lowest id: a total order, so "the k best" and "the smallest
// set of highest-probability tokens" are always exactly one set. A threshold (kv, jend) on that order keeps token j
// iff key_j > kv or (key_j == kv and j < jend), where key is the f32 logit mapped to a u32 of the same order. Top-k
// and top-p thresholds are found by bisection over kv, then over jend only when several tokens tie at kv. Each
// bisection step is a tally (a pass and a workgroup reduction) of the tokens a candidate keeps: over the whole row
// at first, then, once a step leaves at most CAP tokens in play, over those tokens copied to workgroup memory.

struct Params {
    rows: u32,
    v: u32,
    // 0 = off. The host turns k >= V off too.
    top_k: u32,
    // 1 / temperature; unused when greedy.
    inv_temp: f32,
    // top_p >= 1 means off.
    top_p: f32,
    greedy: u32,
    // Row stride of the logits: sampling reads the first v of each row's ld columns (a model's vocabulary may be
    // padded past its tokenizer's).
    ld: u32,
}
var<immediate> p: Params;

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> uniforms: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids_out: array<i32>;

const WG: u32 = 256u;
// Tokens the searches may move to workgroup memory (keys and ids: 4 KiB).
const CAP: u32 = 512u;
// jend that keeps every tie (ids are < V < 2^32 - 1).
const ALL: u32 = 0xffffffffu;

// Of the tokens kept by a pair of thresholds: how many, their mass, the smallest key with its multiplicity; and
// the largest key of the tokens the first threshold keeps but the second drops.
struct Tally {
    count: u32,
    mass: f32,
    kin: u32,
    nin: u32,
    kout: u32,
}

// The argmax pass: the largest key (lowest id among ties) and the smallest key.
struct Top {
    k: u32,
    j: u32,
    kmin: u32,
}

// `sample` uses 14 KiB of workgroup memory, within WebGPU's default 16 KiB.
var<workgroup> tally: array<Tally, WG>;
var<workgroup> tops: array<Top, WG>;
// Each invocation's own largest key.
var<workgroup> thread_top: array<u32, WG>;
// Per invocation, the tokens its last row tally kept, turned into write offsets by `compact`.
var<workgroup> counts: array<u32, WG>;
var<workgroup> cand_k: array<u32, CAP>;
var<workgroup> cand_j: array<u32, CAP>;
var<workgroup> hint_sh: u32;

// The searches' shared state: how many tokens lie in workgroup memory (0 = none yet), and the tally of the tokens
// above them. Uniform: both are set from reduction results only.
var<private> nc: u32;
var<private> above: Tally;

// Order-preserving map of an f32 to a u32 (negatives reversed below the positives). -0 is folded into +0 on the
// bits, not by float arithmetic a fast-math compiler might drop, so equal logits always tie.
fn key_of(x: f32) -> u32 {
    var b = bitcast<u32>(x);
    if (b == 0x80000000u) {
        b = 0u;
    }
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn value_of(k: u32) -> f32 {
    return bitcast<f32>(select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u));
}

fn keeps(k: u32, j: u32, kv: u32, jend: u32) -> bool {
    return (k > kv) | ((k == kv) & (j < jend));
}

// exp((x - m) / T). The maximum gets exactly 1 even when 1/T overflows to infinity (0 · inf would be NaN).
fn weight(x: f32, m: f32) -> f32 {
    let d = x - m;
    return select(exp(d * p.inv_temp), 1.0, d == 0.0);
}

// Adds token (key k, id j) to a tally of the tokens kept by (kk, jk) and (kv, jend). Only kept tokens pay for an
// exp: after the first steps most of the row is dropped.
fn count_token(t: ptr<function, Tally>, k: u32, j: u32, m: f32, kk: u32, jk: u32, kv: u32, jend: u32, want_mass: bool) {
    if (!keeps(k, j, kk, jk)) {
        return;
    }
    if (!keeps(k, j, kv, jend)) {
        (*t).kout = max((*t).kout, k);
        return;
    }
    (*t).count += 1u;
    if (want_mass) {
        (*t).mass += weight(value_of(k), m);
    }
    if (k < (*t).kin) {
        (*t).kin = k;
        (*t).nin = 1u;
    } else if (k == (*t).kin) {
        (*t).nin += 1u;
    }
}

fn merge(a: Tally, b: Tally) -> Tally {
    var r = Tally(a.count + b.count, a.mass + b.mass, a.kin, a.nin, max(a.kout, b.kout));
    if (b.kin < a.kin) {
        r.kin = b.kin;
        r.nin = b.nin;
    } else if (b.kin == a.kin) {
        r.nin = a.nin + b.nin;
    }
    return r;
}

// The tree steps start with a barrier, and workgroupUniformLoad is barrier, load, barrier: all have read the result
// before the next tally overwrites it, and the result is uniform, so loops that branch on it may hold barriers.
fn reduce(lid: u32, t: Tally) -> Tally {
    tally[lid] = t;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            tally[lid] = merge(tally[lid], tally[lid + s]);
        }
    }
    return workgroupUniformLoad(&tally[0]);
}

// One bisection step, over the row (nc = 0) or over the nc tokens in workgroup memory plus `above`. Every tally of a
// search sums in the same order, so its f32 mass is monotone in the threshold (rounding is monotone and the terms
// are non-negative) and equal for thresholds that keep the same tokens: the bisections are well defined.
fn tally_step(base: u32, lid: u32, m: f32, kk: u32, jk: u32, kv: u32, jend: u32, want_mass: bool) -> Tally {
    var t = Tally(0u, 0.0, ALL, 0u, 0u);
    if (nc == 0u) {
        for (var j = lid; j < p.v; j += WG) {
            count_token(&t, key_of(logits[base + j]), j, m, kk, jk, kv, jend, want_mass);
        }
        counts[lid] = t.count;
        return reduce(lid, t);
    }
    for (var i = lid; i < nc; i += WG) {
        count_token(&t, cand_k[i], cand_j[i], m, kk, jk, kv, jend, want_mass);
    }
    return merge(reduce(lid, t), above);
}

// Copies the tokens kept by (kk, jk) with key in [lo, hi] to workgroup memory, in invocation order. `counts` holds
// each invocation's number of them when the last row tally kept exactly these; otherwise `recount`.
fn compact(base: u32, lid: u32, kk: u32, jk: u32, lo: u32, hi: u32, recount: bool) {
    if (recount) {
        var c = 0u;
        for (var j = lid; j < p.v; j += WG) {
            let k = key_of(logits[base + j]);
            c += select(0u, 1u, keeps(k, j, kk, jk) & (k >= lo) & (k <= hi));
        }
        counts[lid] = c;
        workgroupBarrier();
    }
    if (lid == 0u) {
        var acc = 0u;
        for (var i = 0u; i < WG; i++) {
            let c = counts[i];
            counts[i] = acc;
            acc += c;
        }
    }
    workgroupBarrier();
    var at = counts[lid];
    for (var j = lid; j < p.v; j += WG) {
        let k = key_of(logits[base + j]);
        if (keeps(k, j, kk, jk) & (k >= lo) & (k <= hi)) {
            cand_k[at] = k;
            cand_j[at] = j;
            at += 1u;
        }
    }
    workgroupBarrier();
}

// A candidate key in (lo, hi], lo < hi: the midpoint of their values, which halves the tokens in range for the
// usual spread of logits, where key midpoints would spend steps on the many keys of tiny magnitudes around 0; the
// key midpoint when the values leave no float in between (or are infinite).
fn split(lo: u32, hi: u32) -> u32 {
    let v = key_of(0.5 * value_of(lo) + 0.5 * value_of(hi));
    if (v > lo && v <= hi) {
        return v;
    }
    return lo + (hi - lo) / 2u + ((hi - lo) & 1u);
}

// A search's result: the threshold key, the tokens at or above it and the tokens at it (of those (kk, jk) keeps).
struct Found {
    key: u32,
    n: u32,
    ties: u32,
}

// The largest key in [lo, hi] whose tally, of the tokens (kk, jk) keeps, counts at least k (k > 0) or holds mass at
// least goal (k = 0), given that lo's does (n_lo tokens, `ties` at lo). lo and hi stay keys present in the row:
// each step reports the nearest kept and dropped keys around its candidate, so a search takes about log2 of the
// number of distinct keys in range. `probe` is tried first. A count search stops once a step keeps exactly k.
// Once at most CAP tokens lie in [lo, hi], they move to workgroup memory and the tally of those above hi is kept in
// `above`; that changes the order of the mass sums, so the mass compared with goal may move by a rounding, but lo
// stays a present key and hi >= lo, so the search still ends on one of them.
fn search(base: u32, lid: u32, m: f32, kk: u32, jk: u32, lo0: u32, hi0: u32, n_lo0: u32, ties0: u32, probe0: u32, k: u32, goal: f32, want_mass: bool) -> Found {
    var lo = lo0;
    var hi = hi0;
    var n_lo = n_lo0;
    var ties = ties0;
    var probe = probe0;
    var over = Tally(0u, 0.0, ALL, 0u, 0u); // of the tokens above hi, while steps run over the row
    while (lo < hi) {
        var mid = split(lo, hi);
        if (probe > lo && probe <= hi) {
            mid = probe;
        }
        probe = 0u;
        let r = tally_step(base, lid, m, kk, jk, mid, ALL, want_mass);
        // A goal rounded to 0 must not accept a candidate that keeps nothing.
        let ok = select(r.count > 0u && r.mass >= goal, r.count >= k, k > 0u);
        if (ok) {
            lo = r.kin;
            n_lo = r.count;
            ties = r.nin;
        } else {
            hi = r.kout;
            over = r;
        }
        // `above` only stands for the tokens above hi while candidates stay <= hi: top-p, which follows a count
        // search when want_mass, may probe higher, so that search moves only ranges with nothing above.
        let movable = k == 0u || !want_mass || over.count == 0u;
        if (nc == 0u && lo < hi && n_lo - over.count <= CAP && movable) {
            // The last row tally counted exactly [lo, hi] per invocation if it kept lo and nothing lies above hi.
            compact(base, lid, kk, jk, lo, hi, !(ok && over.count == 0u));
            nc = n_lo - over.count;
            above = over;
            above.kout = 0u; // its dropped keys lie below hi, not below later candidates
        }
        if (ok && r.count == k) {
            break;
        }
    }
    return Found(lo, n_lo, ties);
}

// The smallest jend in [1, V] whose tally (kk, jk) ∩ (kv, jend) counts at least k (k > 0) or holds mass at least
// goal: the cut among the tokens tied at kv.
fn cut_ties(base: u32, lid: u32, m: f32, kk: u32, jk: u32, kv: u32, k: u32, goal: f32, want_mass: bool) -> u32 {
    var lo = 1u;
    var hi = p.v;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        let r = tally_step(base, lid, m, kk, jk, kv, mid, want_mass);
        if (select(r.mass >= goal, r.count >= k, k > 0u)) {
            hi = mid;
        } else {
            lo = mid + 1u;
        }
    }
    return lo;
}

// Semantics (the CPU reference in ops/sampling.rs follows them exactly):
// 1. greedy: the argmax, ties to the lowest id.
// 2. top-k: the k first tokens in rank order.
// 3. top-p: of those, the shortest rank-order prefix whose probability (at temperature T, renormalized over the
//    top-k set) is >= p. It always holds the argmax.
// 4. the smallest kept id j whose cumulative kept probability (in id order) exceeds u; u·total is clamped so that a
//    u of 1 or more picks the last kept token of positive weight.
@compute @workgroup_size(WG)
fn sample(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.y * nwg.x + wg.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.ld;

    // Argmax by (key desc, id asc) and the smallest key. Each invocation walks ascending ids, so a strict > keeps
    // its first maximum.
    var top = Top(0u, ALL, ALL);
    for (var j = lid; j < p.v; j += WG) {
        let k = key_of(logits[base + j]);
        if (k > top.k || (k == top.k && j < top.j)) {
            top.k = k;
            top.j = j;
        }
        top.kmin = min(top.kmin, k);
    }
    thread_top[lid] = top.k; // 0, below every real key, for an invocation without tokens
    tops[lid] = top;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            let a = tops[lid];
            let b = tops[lid + s];
            if (b.k > a.k || (b.k == a.k && b.j < a.j)) {
                tops[lid].k = b.k;
                tops[lid].j = b.j;
            }
            tops[lid].kmin = min(a.kmin, b.kmin);
        }
    }
    top = workgroupUniformLoad(&tops[0]);
    if (p.greedy != 0u) {
        if (lid == 0u) {
            ids_out[row] = i32(top.j);
        }
        return;
    }
    let m = logits[base + top.j];

    // First probes from the invocations' maxima, ranked: at least r + 1 tokens reach the maximum of rank r, so for
    // k <= WG the one of rank k - 1 usually keeps only a few more than k. Any key in (lo, hi] is a valid probe: a
    // poor one costs a step, never correctness.
    let mine = thread_top[lid];
    var rank = 0u;
    for (var t = 0u; t < WG; t++) {
        let o = thread_top[t];
        rank += select(0u, 1u, o > mine || (o == mine && t < lid));
    }
    if (rank + 1u == p.top_k) {
        hint_sh = mine;
    }
    let k_hint = workgroupUniformLoad(&hint_sh);

    nc = 0u;
    above = Tally(0u, 0.0, ALL, 0u, 0u);
    // Mass is needed by top-p only, but then from the start: a move to workgroup memory during top-k keeps the
    // tally of the tokens above it, all of which top-k keeps, for top-p.
    let want_mass = p.top_p < 1.0;

    // Top-k: the largest key with at least k tokens at or above it is the k-th token's; if more than k tokens reach
    // it, the tie is cut by id.
    var kk = 0u;
    var jk = ALL;
    if (p.top_k > 0u) {
        // Nobody wrote the hint for k > WG.
        let probe = select(0u, k_hint, p.top_k <= WG);
        let f = search(base, lid, m, 0u, ALL, top.kmin, top.k, p.v, 0u, probe, p.top_k, 0.0, want_mass);
        kk = f.key;
        if (f.n > p.top_k) {
            jk = cut_ties(base, lid, m, 0u, ALL, kk, p.top_k, 0.0, want_mass);
        }
    }

    // Top-p within the top-k set, the same way on mass. The final set is the shorter of the two rank-order
    // prefixes.
    var kv = kk;
    var jv = jk;
    if (want_mass) {
        let lo = max(kk, top.kmin);
        // Every top-k token is at or above lo: this is the top-k set's mass.
        let all = tally_step(base, lid, m, kk, jk, lo, ALL, true);
        let goal = p.top_p * all.mass;
        let f = search(base, lid, m, kk, jk, lo, top.k, all.count, all.nin, 0u, 0u, goal, true);
        var jp = ALL;
        if (f.ties > 1u) {
            jp = cut_ties(base, lid, m, kk, jk, f.key, 0u, goal, true);
        }
        if (f.key > kk || (f.key == kk && jp < jk)) {
            kv = f.key;
            jv = jp;
        }
    }

    // Inverse CDF in id order: each invocation sums the kept mass of its contiguous chunk (into tally[].mass); one
    // invocation then walks the 256 chunk sums and the chosen chunk sequentially, so the running sum it compares
    // with u·total only grows.
    let ch = (p.v + WG - 1u) / WG;
    let j0 = min(lid * ch, p.v);
    let j1 = min(j0 + ch, p.v);
    var s = 0.0;
    for (var j = j0; j < j1; j++) {
        let x = logits[base + j];
        if (keeps(key_of(x), j, kv, jv)) {
            s += weight(x, m);
        }
    }
    tally[lid].mass = s;
    workgroupBarrier();
    if (lid == 0u) {
        var total = 0.0;
        for (var i = 0u; i < WG; i++) {
            total += tally[i].mass;
        }
        let goal = clamp(uniforms[row], 0.0, 1.0) * total;
        // The last chunk with positive mass that starts at or below the goal.
        var acc = 0.0;
        var pick = 0u;
        var start = 0.0;
        for (var i = 0u; i < WG; i++) {
            let c = tally[i].mass;
            if (c > 0.0 && acc <= goal) {
                pick = i;
                start = acc;
            }
            acc += c;
        }
        // The first kept token whose running sum passes the goal; rounding may leave the goal past the chunk's
        // end, and then its last kept token of positive weight. The argmax is the fallback of last resort (NaN
        // logits, every logit -inf).
        var chosen = top.j;
        var run = start;
        let c0 = min(pick * ch, p.v);
        let c1 = min(c0 + ch, p.v);
        for (var j = c0; j < c1; j++) {
            let x = logits[base + j];
            if (keeps(key_of(x), j, kv, jv)) {
                let w = weight(x, m);
                if (w > 0.0) {
                    run += w;
                    chosen = j;
                    if (run > goal) {
                        break;
                    }
                }
            }
        }
        ids_out[row] = i32(chosen);
    }
}
