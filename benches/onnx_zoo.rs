//! Each zoo model (`tests/fixtures/onnx`) through the gateway's ONNX path
//! (tract plus the gateway's operators), and in the same run through
//! onnxruntime's Python API when `python3 -c 'import onnxruntime'` works
//! (`benches/onnxruntime_zoo.py`; set GATEWAY_BENCH_PYTHON to pick the
//! interpreter). Reports per model the time per call for one row and for
//! the 36 reference rows, and the ratio tract / onnxruntime.
//!
//!     cargo bench --bench onnx_zoo
//!
//! Both sides run one call at a time on one thread. The gateway's figure is
//! `OnnxModel::run`: converting the V2 tensors in and out included, as a
//! request pays it. onnxruntime's includes its Python call (~4-5 us, see
//! ../shared/FINDINGS.md). Each side is measured twice, alternating, and the
//! faster median kept, so a burst of noise on the shared machine does not
//! decide a ratio. Results go to stdout and to
//! `$CARGO_TARGET_DIR/onnx-zoo.{md,json}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gateway::onnx::OnnxModel;

mod common;
use gateway::tensor::{Datatype, Tensor};

const REPEATS: usize = 7;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/onnx")
}

/// Median nanoseconds per call of `f`, each sample ~20 ms long.
fn per_call_ns(mut f: impl FnMut()) -> f64 {
    let mut n = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        if start.elapsed().as_millis() > 20 || n > 1 << 20 {
            break;
        }
        n *= 2;
    }
    let mut samples: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            start.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[REPEATS / 2]
}

type Timings = BTreeMap<String, [f64; 2]>;

fn tract(models: &[(String, OnnxModel)], inputs: &[Tensor; 2]) -> Timings {
    models
        .iter()
        .map(|(name, model)| {
            let times = [0, 1].map(|i| {
                per_call_ns(|| {
                    let out = model.run(std::slice::from_ref(&inputs[i])).expect("run");
                    std::hint::black_box(out);
                })
            });
            (name.clone(), times)
        })
        .collect()
}

fn onnxruntime(python: &str, rows: usize) -> Option<Timings> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/onnxruntime_zoo.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(fixtures())
        .arg(REPEATS.to_string())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "onnxruntime side skipped: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        json.as_object()?
            .iter()
            .filter_map(|(name, t)| {
                Some((
                    name.clone(),
                    [t["1"].as_f64()?, t[rows.to_string().as_str()].as_f64()?],
                ))
            })
            .collect(),
    )
}

fn faster(a: Timings, b: Timings) -> Timings {
    a.into_iter()
        .map(|(name, t)| {
            let other = b.get(&name).copied().unwrap_or(t);
            (name, [t[0].min(other[0]), t[1].min(other[1])])
        })
        .collect()
}

fn fp32(shape: &[i64], values: &[f32]) -> Tensor {
    Tensor {
        name: "pr_features".into(),
        datatype: Datatype::Fp32,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects models.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference.json")).expect("reference.json"),
    )
    .expect("reference.json");
    let rows: Vec<f32> = reference["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| r.as_array().expect("row").iter())
        .map(|v| v.as_f64().expect("number") as f32)
        .collect();
    let n = rows.len() / 6;
    let inputs = [fp32(&[1, 6], &rows[..6]), fp32(&[n as i64, 6], &rows)];
    let models: Vec<(String, OnnxModel)> = reference["models"]
        .as_object()
        .expect("models")
        .keys()
        .filter(|name| *name != "ttm_v2")
        .filter(|name| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .map(|name| {
            let model = OnnxModel::load(&fixtures().join(format!("{name}.onnx"))).expect("load");
            (name.clone(), model)
        })
        .collect();

    let python = std::env::var("GATEWAY_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let first = tract(&models, &inputs);
    let ort_first = onnxruntime(&python, n);
    let second = tract(&models, &inputs);
    let ort = match (
        ort_first,
        ort_first_available(&python).then(|| onnxruntime(&python, n)),
    ) {
        (Some(a), Some(Some(b))) => Some(faster(a, b)),
        (a, _) => a,
    };
    let tract = faster(first, second);

    let mut md = format!(
        "| model | tract, 1 row | onnxruntime, 1 row | ratio | tract, {n} rows | onnxruntime, {n} rows | ratio |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut json = serde_json::Map::new();
    let us = |ns: f64| format!("{:.1} us", ns / 1000.0);
    for (name, t) in &tract {
        let o = ort.as_ref().and_then(|o| o.get(name));
        let cell = |i: usize| match o {
            Some(o) => (us(o[i]), format!("{:.2}", t[i] / o[i])),
            None => ("-".into(), "-".into()),
        };
        let (o1, r1) = cell(0);
        let (on, rn) = cell(1);
        md += &format!(
            "| {name} | {} | {o1} | {r1} | {} | {on} | {rn} |\n",
            us(t[0]),
            us(t[1])
        );
        json.insert(
            name.clone(),
            serde_json::json!({"tract_ns": t, "onnxruntime_ns": o}),
        );
    }
    common::write_results(
        "onnx-zoo",
        &md,
        Some(serde_json::Value::Object(json).to_string()),
    );
}

/// Whether the second onnxruntime pass is worth running (the first worked).
fn ort_first_available(python: &str) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import onnxruntime"])
        .output()
        .is_ok_and(|o| o.status.success())
}
