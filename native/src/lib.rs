//! weighbridge_native: the proxy's data path (HTTP/2 forwarding, routing, per-request picks).

use pyo3::prelude::*;

mod engine;
mod events;
mod grpc;
mod health;
mod limits;
mod locality;
mod pool;
mod proxy;
mod retry;
mod routing;
mod slow_start;
mod stats;
mod strategy;
mod tls;
mod workers;

#[pymodule]
fn weighbridge_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::Engine>()?;
    m.add_class::<limits::ClientLimits>()?;
    m.add("STRATEGIES", strategy::NAMES.to_vec())?;
    Ok(())
}
