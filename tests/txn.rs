//! The transactional producer on its own, on a real broker (as rust-rdkafka's transaction tests do):
//! a committed batch is visible with its offsets; a failed one leaves nothing visible and the committed
//! offsets unchanged, and names the record the broker refused; a fenced producer fails and is replaced.

mod common;

use std::time::Duration;

use common::Env;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use switchyard::config::RECORD_LIMIT;
use switchyard::kafka::txn::TxnProducer;
use switchyard::kafka::{self, OutRecord};
use switchyard::shutdown::ShutdownTrigger;

const LIMIT: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_leave_nothing_and_fenced_producers_are_replaced() {
    let Some(env) = Env::new("txn").await else { return };
    let (input, output) = (env.config.topics.requests.clone(), env.config.topics.decisions.clone());
    env.produce((0..10).map(|i| OutRecord::new(input.clone(), format!("k{i}"), vec![i])).collect()).await;
    let group = format!("{}-txn", env.config.service.group_id);
    let consumer = kafka::group_consumer(&env.config, &group, None).unwrap();
    consumer.subscribe(&[input.as_str()]).unwrap();
    let mut read = 0;
    while read < 10 {
        read += kafka::batch::next_batch(&consumer, 10, Duration::from_millis(200), LIMIT).await.unwrap().len();
    }
    let committed_offset = |consumer: &rdkafka::consumer::StreamConsumer<_>| -> i64 {
        let committed = kafka::batch::committed(consumer).unwrap();
        committed.elements().iter().map(|e| if let Offset::Offset(n) = e.offset() { n } else { 0 }).sum()
    };
    let offsets = |to: i64| {
        let mut list = TopicPartitionList::new();
        for partition in 0..env.config.topics.partitions {
            list.add_partition_offset(&input, partition, Offset::Offset(to.min(10))).unwrap();
        }
        list
    };
    let out = |n: usize, tag: &str| -> Vec<OutRecord> {
        (0..n).map(|i| OutRecord::new(output.clone(), format!("k{i}"), format!("{tag}-{i}").into_bytes())).collect()
    };
    let (_trigger, shutdown) = ShutdownTrigger::new();
    let id = format!("{}-txn-producer", env.config.service.group_id);
    let mut producer = TxnProducer::new(&env.config, "test", id.clone(), shutdown).unwrap();

    // Committed: records visible, offsets moved.
    producer.commit(&out(5, "first"), &offsets(0), consumer.group_metadata()).await.expect("first commit");
    assert_eq!(env.read_raw(&output, 5, LIMIT, SETTLE).await.len(), 5);
    let before = committed_offset(&consumer);

    // One record too large for any topic: the transaction fails, names it, and leaves nothing behind.
    let mut records = out(4, "aborted");
    records.insert(2, OutRecord::new(output.clone(), "big", vec![7u8; RECORD_LIMIT + 1]));
    let failure = producer.commit(&records, &offsets(3), consumer.group_metadata()).await.expect_err("refused");
    assert_eq!(failure.refused.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![2], "{failure:?}");
    let visible = env.read_raw(&output, 5, LIMIT, SETTLE).await;
    assert_eq!(visible.len(), 5, "nothing of the aborted transaction is visible to read_committed readers");
    assert!(visible.iter().all(|r| r.value.starts_with(b"first")));
    assert_eq!(committed_offset(&consumer), before, "committed offsets unchanged after the abort");

    // Fenced by another producer with the same transactional id: the commit fails, the producer is
    // replaced, and the next commit goes through.
    let fencer = kafka::transactional_producer(&env.config, &id).unwrap();
    tokio::task::block_in_place(|| rdkafka::producer::Producer::init_transactions(&fencer, LIMIT)).unwrap();
    assert!(producer.commit(&out(2, "fenced"), &offsets(3), consumer.group_metadata()).await.is_err());
    producer.commit(&out(2, "after"), &offsets(3), consumer.group_metadata()).await.expect("replaced producer commits");
    let visible = env.read_raw(&output, 7, LIMIT, SETTLE).await;
    assert_eq!(visible.len(), 7);
    assert!(!visible.iter().any(|r| r.value.starts_with(b"fenced") || r.value.starts_with(b"aborted")));
    assert!(committed_offset(&consumer) > before, "offsets committed with the last transaction");
}

/// What the rollout controller relies on to tell that a stage has processed everything: a stretch holding
/// only a commit marker reads as empty, one holding a record does not, and a transaction left open by a
/// dead writer holds the stretch unknown until the writer's transactional id is fenced — then its
/// aborted records read as nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_read_as_empty_and_a_dead_writers_transaction_is_fenced_away() {
    use rdkafka::producer::Producer;
    use switchyard::kafka::{GapReader, LogEnds};
    use tokio::task::block_in_place;

    let Some(env) = Env::new("gap").await else { return };
    let topic = env.config.topics.decisions.clone();
    let id = format!("{}-gap-writer", env.config.service.group_id);
    let writer = kafka::transactional_producer(&env.config, &id).unwrap();
    block_in_place(|| writer.init_transactions(LIMIT)).unwrap();
    let records = |n: usize| -> Vec<OutRecord> {
        (0..n)
            .map(|i| {
                let mut r = OutRecord::new(topic.clone(), format!("k{i}"), vec![i as u8]);
                r.partition = Some(0);
                r
            })
            .collect()
    };
    // Three records committed: offsets 0-2, the commit marker at 3.
    writer.begin_transaction().unwrap();
    kafka::send_all(&writer, &records(3)).await.unwrap();
    block_in_place(|| writer.commit_transaction(LIMIT)).unwrap();
    let ends = LogEnds::new(&env.config).unwrap();
    assert_eq!(block_in_place(|| ends.of(&topic, 0)).unwrap().1, 4);
    let mut gaps = GapReader::new(&env.config);
    let known = async |gaps: &mut GapReader, from: i64, to: i64| -> Option<bool> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(answer) = block_in_place(|| gaps.empty(&topic, 0, from, to)).unwrap() {
                return Some(answer);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(known(&mut gaps, 3, 4).await, Some(true), "only the marker lies between");
    assert_eq!(known(&mut gaps, 2, 4).await, Some(false), "a record lies between");

    // Two records in a transaction its writer never ends (it died): unknown while it is open.
    writer.begin_transaction().unwrap();
    kafka::send_all(&writer, &records(2)).await.unwrap();
    let open_end = block_in_place(|| ends.of(&topic, 0)).unwrap().1;
    assert_eq!(open_end, 6);
    assert_eq!(known(&mut gaps, 4, open_end).await, None, "held back by the open transaction");
    // Fenced by its transactional id (what a stage does to a previous owner that left the group): the
    // transaction is aborted and its records are never delivered.
    block_in_place(|| kafka::txn::fence(&env.config, &id)).unwrap();
    let end = block_in_place(|| ends.of(&topic, 0)).unwrap().1;
    assert_eq!(end, 7, "the abort marker");
    assert_eq!(known(&mut gaps, 4, end).await, Some(true), "aborted records and markers only");
    drop(writer);
    env.stop().await;
}
