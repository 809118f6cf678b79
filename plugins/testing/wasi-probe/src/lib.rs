//! Test plugin: tries one WASI capability, chosen by the first element of its
//! INT32 input `mode`, so tests can check what a plugin is (not) granted:
//!
//! 0. read the wall clock;
//! 1. seed a `HashMap` (random numbers);
//! 2. read a file;
//! 3. open a TCP connection;
//! 4. read the environment (granted: it is empty);
//! 5. print to stdout and stderr (granted: captured by the gateway);
//! 6. hash 0 with a fresh `RandomState` (random numbers: the value depends
//!    on the seed only);
//! 7. sleep 10 ms and read the monotonic clock (seconds that passed);
//! 8. sleep 60 s (seconds that passed).
//!
//! Output `y` holds one number describing what it saw.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct WasiProbe;

fn probe(mode: i32) -> Result<f64, String> {
    Ok(match mode {
        0 => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs_f64(),
        1 => {
            let mut map = std::collections::HashMap::new();
            map.insert(1, 2);
            map.len() as f64
        }
        2 => std::fs::read("/etc/hostname")
            .map_err(|e| e.to_string())?
            .len() as f64,
        3 => {
            std::net::TcpStream::connect("127.0.0.1:1").map_err(|e| e.to_string())?;
            1.0
        }
        4 => std::env::vars().count() as f64,
        6 => {
            use std::hash::BuildHasher;
            // The top 53 bits: exact in an f64.
            (std::collections::hash_map::RandomState::new().hash_one(0u64) >> 11) as f64
        }
        7 | 8 => {
            let started = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(if mode == 7 {
                10
            } else {
                60_000
            }));
            started.elapsed().as_secs_f64()
        }
        _ => {
            println!("hello from the probe on stdout");
            eprintln!("hello from the probe on stderr");
            5.0
        }
    })
}

impl Guest for WasiProbe {
    fn info() -> ModelInfo {
        ModelInfo::new("wasi-probe", "0.1.0", "tries one WASI capability")
            .input(TensorSpec::new("mode", Datatype::Int32, &[1]))
            .output(TensorSpec::new("y", Datatype::Fp64, &[1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let mode = gateway_plugin_sdk::input(&inputs, "mode")?.to_i32()?;
        let seen = probe(mode.first().copied().unwrap_or(0)).map_err(Error::Internal)?;
        Ok(vec![Tensor::fp64("y", &[1], &[seen])])
    }
}

gateway_plugin_sdk::export_model!(WasiProbe);
