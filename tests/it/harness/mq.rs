//! RabbitMQ in tests: a queue that sees every event a test's exchange receives.

use devgate::mq::{Mq, QueueType};
use lapin::{
    options::{
        BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};

/// Declares (through `mq`, as the relay would) the events exchange of `mq`'s prefix, an
/// exclusive queue named after `name` bound to it with `#`, and a consumer without acks.
pub async fn bind_all(mq: &Mq, name: &str) -> (lapin::Channel, lapin::Consumer, String) {
    let channel = mq.channel().await.expect("RabbitMQ at 127.0.0.1:5672");
    let queue = mq.queue_name(name);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            QueueType::Classic.arguments(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            mq.events_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            name.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (channel, consumer, queue)
}

/// Deletes every queue `mq` declared and its events exchange (a World's teardown). Runs on a
/// thread of its own: Drop runs inside the test's runtime.
pub fn delete_declared(mq: &Mq) {
    let (queues, exchange, config) = (
        mq.declared_queues(),
        mq.events_exchange(),
        mq.config().clone(),
    );
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let Ok(channel) = Mq::new(config).channel().await else {
                return;
            };
            for queue in queues {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        });
    })
    .join();
}
