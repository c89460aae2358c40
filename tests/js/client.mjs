// A busserve client written without busserve: publish a JSON GenerateRequest on the generate subject with an inbox
// as reply-to, then read TokenChunk events from that inbox until the one terminal event (final or error). Status
// events (who holds the request) are skipped; a token index out of order is a lost event, reported as an error.
//   node client.mjs nats://127.0.0.1:4222 "prompt text" [max_tokens]
import { connect, headers, createInbox } from "nats";

const [url, prompt, maxTokens = "16"] = process.argv.slice(2);
const nc = await connect({ servers: url });
const inbox = createInbox();
const sub = nc.subscribe(inbox);
const h = headers();
h.set("Content-Type", "application/json");
const request = {
  type: "generate",
  messages: [{ role: "user", content: prompt }],
  sampling: { max_tokens: Number(maxTokens), temperature: 0 },
  stream: { content_type: "json" },
};
nc.publish("busserve.v1.generate", JSON.stringify(request), { reply: inbox, headers: h });

let text = "";
let next = 0;
const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 120000);
for await (const m of sub) {
  const event = JSON.parse(new TextDecoder().decode(m.data));
  if (event.type === "status") {
    continue;
  } else if (event.type === "token") {
    if (event.index !== next) {
      console.error(`stream gap: token ${event.index} arrived where ${next} was due`);
      process.exit(4);
    }
    next += event.token_ids.length;
    text += event.text;
  } else {
    clearTimeout(timer);
    console.log(JSON.stringify({ text, terminal: event }));
    await nc.drain();
    process.exit(event.type === "final" ? 0 : 2);
  }
}
