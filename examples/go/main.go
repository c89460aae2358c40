// A busserve client in Go, written without busserve: the wire contract is schemas/messages.schema.json and
// schemas/asyncapi.json, the transport is the official nats.go package.
//
//	go run . nats://127.0.0.1:4222 "prompt text" [max_tokens] [cancel_after]
//
//  1. Publish a JSON GenerateRequest on busserve.v1.generate.<user> (busserve.v1.generate on an open bus) with an
//     inbox of our own as reply-to: the stream of the request arrives there.
//  2. Read events until the one terminal event ("final" or "error"); "status" events are skipped. A token's index
//     must be the next one due: anything else is a lost or repeated event.
//  3. With cancel_after, publish a Cancel after that many tokens; the stream still ends with its final event
//     (finish_reason "cancelled").
//
// On a secured bus set BUSSERVE_NATS_USER / BUSSERVE_NATS_PASSWORD: the user's inbox is _INBOX.<user>.
// Prints {"text", "tokens", "terminal"} as JSON; exit 0 on final, 2 on an error event, 3 on a timeout, 4 on a gap.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
)

type event struct {
	Type     string `json:"type"`
	Index    int    `json:"index"`
	TokenIDs []int  `json:"token_ids"`
	Text     string `json:"text"`
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: client URL PROMPT [max_tokens] [cancel_after]")
		os.Exit(1)
	}
	url, prompt := os.Args[1], os.Args[2]
	maxTokens, cancelAfter := 16, -1
	if len(os.Args) > 3 {
		maxTokens, _ = strconv.Atoi(os.Args[3])
	}
	if len(os.Args) > 4 {
		cancelAfter, _ = strconv.Atoi(os.Args[4])
	}
	user := os.Getenv("BUSSERVE_NATS_USER")
	opts := []nats.Option{}
	suffix := ""
	if user != "" {
		opts = append(opts, nats.UserInfo(user, os.Getenv("BUSSERVE_NATS_PASSWORD")),
			nats.CustomInboxPrefix("_INBOX."+user))
		suffix = "." + user
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer nc.Close()
	inbox := nc.NewRespInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	requestID := fmt.Sprintf("go-%d", time.Now().UnixNano())
	request, _ := json.Marshal(map[string]any{
		"type":       "generate",
		"request_id": requestID,
		"messages":   []map[string]string{{"role": "user", "content": prompt}},
		"sampling":   map[string]any{"max_tokens": maxTokens, "temperature": 0, "ignore_eos": cancelAfter >= 0},
		"stream":     map[string]string{"content_type": "json"},
	})
	msg := nats.NewMsg("busserve.v1.generate" + suffix)
	msg.Reply = inbox
	msg.Header.Set("Content-Type", "application/json")
	msg.Data = request
	if err := nc.PublishMsg(msg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	text, next, cancelled := "", 0, false
	deadline := time.Now().Add(120 * time.Second)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			fmt.Fprintln(os.Stderr, "timed out:", err)
			os.Exit(3)
		}
		var ev event
		if err := json.Unmarshal(m.Data, &ev); err != nil {
			fmt.Fprintln(os.Stderr, "undecodable event:", err)
			continue
		}
		switch ev.Type {
		case "status":
			continue
		case "token":
			if ev.Index != next {
				fmt.Fprintf(os.Stderr, "stream gap: token %d arrived where %d was due\n", ev.Index, next)
				os.Exit(4)
			}
			next += len(ev.TokenIDs)
			text += ev.Text
			if cancelAfter >= 0 && !cancelled && next >= cancelAfter {
				cancelled = true
				cancel, _ := json.Marshal(map[string]string{"type": "cancel", "request_id": requestID,
					"reason": "the example cancels"})
				c := nats.NewMsg("busserve.v1.cancel" + suffix)
				c.Header.Set("Content-Type", "application/json")
				c.Data = cancel
				_ = nc.PublishMsg(c)
			}
		default:
			var terminal map[string]any
			_ = json.Unmarshal(m.Data, &terminal)
			out, _ := json.Marshal(map[string]any{"text": text, "tokens": next, "terminal": terminal})
			fmt.Println(string(out))
			if ev.Type == "final" {
				os.Exit(0)
			}
			os.Exit(2)
		}
	}
}
