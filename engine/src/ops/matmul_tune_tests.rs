//! The autotuner's classes, cache file and decisions.

use super::*;
use crate::ops::matmul::matmul_shape;
use crate::testing::{gpu, random_vec};

fn shape(m: usize, n: usize, k: usize) -> MatmulShape {
    MatmulShape { batch: 1, m, n, k, broadcast_b: false }
}

#[test]
fn classes_follow_output_size_and_vec4_rows() {
    let c = |m, n, k, spec| ShapeClass::of(&shape(m, n, k), spec);
    assert_eq!(c(256, 256, 8, MatmulSpec::nn()).key(), "small");
    assert_eq!(c(257, 256, 8, MatmulSpec::nn()).key(), "medium");
    assert_eq!(c(1024, 1024, 8, MatmulSpec::nn()).key(), "medium");
    assert_eq!(c(1025, 1024, 8, MatmulSpec::nn()).key(), "large");
    // The contiguous dimension decides: K for a row-major A, M for a transposed one; N for B, K transposed.
    assert_eq!(c(3, 8, 8, MatmulSpec::nn()).key(), "small");
    assert_eq!(c(3, 8, 8, MatmulSpec::tn()).key(), "small-unaligned");
    assert_eq!(c(8, 3, 8, MatmulSpec::nt()).key(), "small");
    assert_eq!(c(8, 3, 8, MatmulSpec::nn()).key(), "small-unaligned");
    assert_eq!(c(8, 8, 5, MatmulSpec::nn()).key(), "small-unaligned");
    // Every class has a distinct name and a problem that lands in the class itself.
    for class in ShapeClass::ALL {
        for software in [true, false] {
            let (m, n, k) = class.problem(software);
            let got = ShapeClass::of(&shape(m, n, k), MatmulSpec::nn());
            assert_eq!(got.vec4, class.vec4, "{class:?}");
            if !software {
                assert_eq!(got, class);
            }
        }
    }
    let mut keys: Vec<_> = ShapeClass::ALL.iter().map(|c| c.key()).collect();
    keys.dedup();
    assert_eq!(keys.len(), ShapeClass::ALL.len());
}

#[test]
fn cache_file_round_trips_and_replaces_a_class() {
    let dir = std::env::temp_dir().join(format!("kiln-tune-{}", std::process::id()));
    let file = dir.join("sub").join("matmul-autotune.tsv");
    let _ = std::fs::remove_dir_all(&dir);
    let small = ShapeClass::ALL[0];
    let large = ShapeClass::ALL[2];
    let reg = MatmulVariant::Register;
    let blk = MatmulVariant::Blocked(BlockedConfig::CANDIDATES[3]);
    assert_eq!(read_cache(&file, "gpu A", small), None, "a missing file is an empty cache");
    write_cache(&file, "gpu A", small, reg, 52.5).unwrap();
    write_cache(&file, "gpu A", large, blk, 10.0).unwrap();
    write_cache(&file, "gpu B", small, blk, 1000.0).unwrap();
    assert_eq!(read_cache(&file, "gpu A", small), Some((reg, Some(52.5))));
    assert_eq!(read_cache(&file, "gpu B", small), Some((blk, Some(1000.0))));
    assert_eq!(read_cache(&file, "gpu B", large), None);
    // Retuning a class replaces its line instead of appending another.
    write_cache(&file, "gpu A", small, blk, 60.0).unwrap();
    assert_eq!(read_cache(&file, "gpu A", small), Some((blk, Some(60.0))));
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert_eq!(cached_for(&file, "gpu A").len(), 2);
    // A line this version cannot read (a future variant, a hand edit) is skipped, not fatal.
    std::fs::write(&file, format!("{text}gpu A\tmedium\twarp-speed\t1\ngarbage\n")).unwrap();
    assert_eq!(read_cache(&file, "gpu A", small), Some((blk, Some(60.0))));
    assert_eq!(cached_for(&file, "gpu A").len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_race_returns_a_candidate_and_the_choice_is_kept() {
    let gpu = gpu();
    let all = candidates(gpu);
    assert!(!all.is_empty());
    assert!(!all.contains(&MatmulVariant::Tiled));
    // Race two blocked candidates directly (what `choose` does for a class with no cache entry).
    let two =
        [MatmulVariant::Blocked(BlockedConfig::CANDIDATES[3]), MatmulVariant::Blocked(BlockedConfig::CANDIDATES[5])];
    let (v, gflops) = race(gpu, ShapeClass::ALL[3], &two).unwrap();
    assert!(two.contains(&v) && gflops > 0.0 && gflops.is_finite(), "{v} {gflops}");
    // In-process decisions are made once: the second call is the same choice, and it is reported.
    let a = gpu.upload(&random_vec(12, 1), &[3, 4]).unwrap();
    let b = gpu.upload(&random_vec(20, 2), &[4, 5]).unwrap();
    let s = matmul_shape(&a, &b, MatmulSpec::nn()).unwrap();
    let class = ShapeClass::of(&s, MatmulSpec::nn());
    let first = choose(gpu, class).unwrap();
    assert_eq!(choose(gpu, class).unwrap(), first);
    assert!(all.contains(&first.variant) || std::env::var_os("KILN_MATMUL").is_some(), "{first:?}");
    assert!(decided(gpu).iter().any(|(k, c)| *k == class.key() && *c == first));
}
