//! The server: builds the node and the HTTP app from a [`Config`], runs the
//! accept loop of each listener (the public one, and the internal one when
//! `server.internal_listen` is set) with the node's load sensor and history
//! sweeper beside them, and drains gracefully on shutdown. Its
//! [`Publisher`] is the in-process ingress, beside `POST /api/events`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{KeyError, Verifier};
use crate::bus::{Bus, BusError};
use crate::config::Config;
use crate::http::{App, DemoPage, Surface};
use crate::metrics::Metrics;
use crate::node::{self, Node};
use crate::protocol::event::{self, BatchError, DomainEvent, Known, Passthrough};

/// Startup failures, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} (server.listen): {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot listen on {addr} (server.internal_listen): {source}")]
    BindInternal { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Why [`Publisher::publish`] took none of a batch.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A passthrough event of the batch is malformed ([`event::known`]).
    #[error(transparent)]
    Invalid(#[from] BatchError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A bound, ready-to-run Herald node.
pub struct Server {
    listener: TcpListener,
    /// `server.internal_listen`'s listener, when set: the operator's routes
    /// move here (see [`Surface`]).
    internal: Option<TcpListener>,
    app: Arc<App>,
    /// Tracks HTTP connection tasks, the load sensor and the history sweeper
    /// (WebSocket tasks are in `app.node.tasks`).
    http_tasks: TaskTracker,
    /// One permit per HTTP connection until it ends or upgrades
    /// (`server.max_http_connections`); each connection task holds its own.
    http_limit: Arc<Semaphore>,
    /// The same for the internal listener, apart so that a flood on the
    /// public port cannot lock monitoring and the server API out.
    internal_limit: Arc<Semaphore>,
    /// How long a client may take to send its request headers.
    header_timeout: Duration,
    grace: Duration,
}

/// Publishes domain events into a running node: the in-process ingress.
#[derive(Clone)]
pub struct Publisher {
    bus: Arc<dyn Bus>,
    /// Counts the unknown types it sets aside, as `POST /api/events` does.
    metrics: Arc<Metrics>,
    /// The node's `events.passthrough`.
    passthrough: Arc<Passthrough>,
}

impl Publisher {
    /// Hands the events of known and passthrough type to the bus; unknown
    /// types are counted and ignored, like at `POST /api/events` (whatever
    /// `api.reject_unknown` says: that is the HTTP API's switch) and decided
    /// by the same [`event::known`]. `Ok` means every one kept was accepted.
    pub async fn publish(&self, events: Vec<DomainEvent>) -> Result<(), PublishError> {
        let Known { events, ignored, .. } = event::known(events, &self.passthrough)?;
        if ignored > 0 {
            self.metrics.events_unknown.fetch_add(ignored as u64, Ordering::Relaxed);
        }
        if events.is_empty() {
            return Ok(());
        }
        Ok(self.bus.publish(events).await?)
    }
}

impl Server {
    /// Builds the node and binds its listener. `config` must be validated
    /// and carry a key (see `Config::validate`).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let verifier = Verifier::from_config(&config.auth)?;
        let node = Arc::new(Node::build(&config).await?);
        let addr = config.server.listen;
        let listener = listen(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let internal = match config.server.internal_listen {
            Some(addr) => Some(listen(addr).map_err(|source| ServerError::BindInternal { addr, source })?),
            None => None,
        };
        let app = Arc::new(App {
            node,
            verifier,
            api_keys: config.api.keys.clone(),
            allowed_origins: config.auth.allowed_origins.clone(),
            max_body_bytes: config.server.max_body_bytes,
            conn_limit: Arc::new(Semaphore::new(config.server.max_connections)),
            ui: crate::http::Ui { enabled: config.ui.enabled, demo: None },
            started: Instant::now(),
            bus_kind: config.bus.kind,
        });
        Ok(Server {
            listener,
            internal,
            app,
            http_tasks: TaskTracker::new(),
            http_limit: Arc::new(Semaphore::new(config.server.max_http_connections)),
            internal_limit: Arc::new(Semaphore::new(config.server.max_http_connections)),
            header_timeout: config.server.header_read_timeout,
            grace: config.server.shutdown_grace,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // ok: a bound listener always has a local address.
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The internal listener's address actually bound, when
    /// `server.internal_listen` is set.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the server API (`/api/*`) is served: the internal listener
    /// when there is one, else the public one.
    pub fn api_addr(&self) -> SocketAddr {
        self.internal_addr().unwrap_or_else(|| self.local_addr())
    }

    /// Gives the page at `/` a demo user to run as (the true embedded
    /// default; `ui.enabled: false` still keeps the page off). The page and
    /// `/demo/token` hand `demo`'s key and tokens signed with its secret to
    /// any request naming a loopback `Host`: give it only credentials made
    /// for the demo, never configured ones.
    pub fn with_demo_page(mut self, demo: DemoPage) -> Server {
        // ok to skip when shared: nothing clones the app before `run`.
        if let Some(app) = Arc::get_mut(&mut self.app) {
            app.ui.demo = Some(demo);
        }
        self
    }

    /// The in-process publisher of this node.
    pub fn publisher(&self) -> Publisher {
        let node = &self.app.node;
        Publisher {
            bus: node.bus.clone(),
            metrics: node.metrics.clone(),
            passthrough: node.passthrough.clone(),
        }
    }

    /// Serves until `shutdown` is cancelled (sensing load and sweeping
    /// history meanwhile), then drains: stops accepting on every listener,
    /// closes every WebSocket with 1001, and waits up to the grace period.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server { listener, internal, app, http_tasks, http_limit, internal_limit, header_timeout, grace } =
            self;
        http_tasks.spawn(node::sense_load(app.node.clone(), shutdown.clone()));
        http_tasks.spawn(node::sweep_history(app.node.clone(), shutdown.clone()));
        http_tasks.spawn(crate::presence::run(app.node.clone(), shutdown.clone()));
        let public = if internal.is_some() { Surface::Public } else { Surface::All };
        let serve = |listener, surface, limit| Accept {
            listener,
            surface,
            app: app.clone(),
            tasks: http_tasks.clone(),
            limit,
            header_timeout,
            shutdown: shutdown.clone(),
        };
        // Both loops end at the same signal, each dropping its listener.
        let public = serve(listener, public, http_limit).run();
        let internal = async {
            if let Some(listener) = internal {
                serve(listener, Surface::Internal, internal_limit).run().await;
            }
        };
        tokio::join!(public, internal);
        tracing::info!("shutting down: closing connections with 1001");
        app.node.shutdown.cancel();
        app.node.users.shut_down_all();
        app.node.tasks.close();
        http_tasks.close();
        let drained = tokio::time::timeout(grace, async {
            app.node.tasks.wait().await;
            http_tasks.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                remaining = app.node.tasks.len(),
                "shutdown grace period (server.shutdown_grace) ended with connections still open"
            );
        }
    }
}

/// One listener's accept loop and what its connections need.
struct Accept {
    listener: TcpListener,
    /// The routes this listener serves.
    surface: Surface,
    app: Arc<App>,
    /// Where its connection tasks are tracked (the server's HTTP tasks).
    tasks: TaskTracker,
    /// One permit per open HTTP connection of this listener; each
    /// connection task holds its own until it ends or upgrades.
    limit: Arc<Semaphore>,
    header_timeout: Duration,
    shutdown: CancellationToken,
}

impl Accept {
    /// Accepts until `shutdown`, then drops the listener (stops accepting).
    async fn run(self) {
        let Accept { listener, surface, app, tasks, limit, header_timeout, shutdown } = self;
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(5);
                    stream
                }
                Err(e) => {
                    // Usually fd exhaustion: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            // Bounded like WebSockets: a flood of connections that never
            // finish a request is shed at accept, not queued.
            let metrics = app.node.metrics.clone();
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                metrics.http_rejected.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let _permit = permit;
                metrics.http_connections.fetch_add(1, Ordering::Relaxed);
                let _gauge = Decrement(&metrics.http_connections);
                let service = service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.handle(surface, req).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                    }
                }
            });
        }
    }
}

/// Takes one off a gauge when dropped, however its task ends.
struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds with a deep accept backlog: bursts of thousands of connects are normal.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// The in-process ingress sets unknown types aside like `POST /api/events`:
    /// counted, and never handed to the bus (so never delivered).
    #[tokio::test]
    async fn the_publisher_counts_unknown_types_and_publishes_the_rest() -> TestResult {
        let node = Node::build(&Config::default()).await?;
        let publisher = Publisher {
            bus: node.bus.clone(),
            metrics: node.metrics.clone(),
            passthrough: node.passthrough.clone(),
        };
        let chat = crate::protocol::ChatId::from_u128(1);
        let body = format!(
            r#"[{{"type":"future.thing"}},{{"type":"message.sent","chat_id":"{chat}","data":{{}}}},{{"type":"chat.poked"}}]"#
        );
        publisher.publish(event::parse_batch(body.as_bytes())?).await?;
        assert_eq!(node.metrics.events_unknown.load(Ordering::Relaxed), 2);
        assert_eq!(node.metrics.events_in.load(Ordering::Relaxed), 1, "only the known event was delivered");
        Ok(())
    }
}
