//! The thread the bus's subscription connections are read on: a runtime of its own, so what
//! Redis pushes leaves the kernel's socket buffer for the delivery queue as soon as it arrives,
//! however busy the node's runtime is. (Command connections stay on the node's runtime: their
//! replies wake their callers there, and read here every reply woke its caller from another
//! thread, which halved the events published at saturation.)
//!
//! Why: the overload word a node shares ([`super::pressure`]) counts the pushes waiting in the
//! delivery queue and the frames its readers owe. Pushes still unread in the socket count nowhere.
//! When a connection's reader was a task on the node's runtime, a busy runtime left 400-600
//! events unread there (measured: `ss` Recv-Q up to 178 KB), which then landed at once, after
//! the word could have held their publishers back, and dropped readers past history. Read here,
//! they wait in the queue, where the word counts them.
//!
//! The redis crate spawns a connection's reader on the runtime that opens it, so opening it here
//! is all it takes; commands are still sent from any task (a channel to the reader).

use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult};
use tokio::runtime::Handle;

/// The I/O runtime, once started (`None`: it could not be, and connections are opened, and read,
/// on the caller's runtime as before).
static RUNTIME: OnceLock<Option<Handle>> = OnceLock::new();

/// The I/O runtime's handle, started on first use: one thread for every bus of the process (a
/// subscription connection's reader only parses and forwards, so one thread keeps up with many).
fn runtime() -> Option<&'static Handle> {
    RUNTIME
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let spawned = std::thread::Builder::new().name("herald-redis-io".into()).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => {
                        let _ = tx.send(Some(runtime.handle().clone()));
                        // Lives as long as the process: connections come and go on it.
                        runtime.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not start the redis I/O runtime");
                        let _ = tx.send(None);
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start the redis I/O thread");
                return None;
            }
            // Waits once per process, for a thread to build an empty runtime.
            rx.recv().ok().flatten()
        })
        .as_ref()
}

/// Opens `client`'s connection with `config` on the I/O thread (or, when it could not start, here:
/// the bus still works, only its overload word misses what waits in the socket). Gives up after
/// `within` whatever the I/O thread does (the connection's own timeouts run there).
pub(super) async fn connect(
    client: &redis::Client,
    config: &AsyncConnectionConfig,
    within: Duration,
) -> RedisResult<MultiplexedConnection> {
    let Some(runtime) = runtime() else {
        return client.get_multiplexed_async_connection_with_config(config).await;
    };
    let (client, config) = (client.clone(), config.clone());
    let task = Abort(
        runtime.spawn(async move { client.get_multiplexed_async_connection_with_config(&config).await }),
    );
    match tokio::time::timeout(within, run(task)).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "connecting on the redis I/O thread timed out",
        ))),
    }
}

/// Awaits the opening task; a panic in it is the caller's error (an I/O error: the session retries).
async fn run(mut task: Abort<RedisResult<MultiplexedConnection>>) -> RedisResult<MultiplexedConnection> {
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "the redis I/O thread could not open the connection",
            e.to_string(),
        ))),
    }
}

/// Aborts the opening when the caller stops waiting (a session timed out or the bus stopped), so
/// no connection is opened for nobody.
struct Abort<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Abort<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
